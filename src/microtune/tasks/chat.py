"""Task ``chat``: a multi-turn conversation in, the assistant's next reply out (OpenAI's fine-tuning format as it is).

Rows are OpenAI chat fine-tuning rows, ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``,
read whole (the system message and every earlier turn kept), with OpenAI's optional ``weight`` (0 or 1) on assistant
messages. ``normalize`` reports every turn-order problem of a row at once: a system message only first, then user and
assistant alternating from a user turn, the last turn an assistant's, no empty content, no unknown role, a weight of
0 or 1 on assistant messages only. Examples are ``{"text": transcript, "messages": the turns before the last reply,
"target": the last reply, "references": [it], "weight": its weight}``; ``text`` (the turns without the system
message, one ``role: content`` line each) is what duplicate, leakage, drift and similar-shot checks compare.

Training (``conversation``) puts loss on the assistant turns ``task.loss_on`` names: ``all`` (OpenAI's default:
every assistant turn whose weight is not 0) or ``last`` (the last reply only). ``tasks.render.Renderer.encode_turns``
turns the conversation into ids and a label per token. Eval and serving score the last reply given the
conversation before it, decoded and measured as ``generate`` does (ROUGE-L, lengths, valid rate). A conversation
without a system message gets the recipe's ``instruction`` as its system message, in training, eval and serving alike.

Few-shot baseline: the shots are whole train conversations shown in the system message, each with the reply that was
expected (stitching other conversations into this one as turns would change what the model is answering).
Synth is refused (``synth`` is ``None`` and a recipe with a ``synth`` section is refused at check, ``SYNTH_REFUSAL``):
the teacher prompts, row schema and filters work on one input and one answer, not on whole conversations.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

import microtune.tasks.base as base
from microtune.tasks.base import Row, RowProblems
from microtune.tasks.generate import GenerateTask

ROLES = ("system", "user", "assistant")
SYNTH_REFUSAL = (
    "synth writes one input and one answer per row and filters them as such (length, copy, near-duplicate, the target "
    "checks); it cannot write or check whole conversations turn by turn"
)
SYNTH_ALTERNATIVE = (
    "remove the `synth` section; write conversations with your teacher outside microtune and add them to data.train (OpenAI "
    "chat rows), or synthesise single-turn rows with a task.type generate recipe"
)


class ChatConfig(base.TaskSection):
    """Task `chat`: a conversation (OpenAI chat fine-tuning rows, system message and earlier turns kept) → the next reply."""

    type: Literal["chat"] = base.type_field("chat")
    instruction: str = Field(
        ..., min_length=1, description="What the model must do, in plain words; the system message of conversations that "
        "have none (a row's own system message is kept)."
    )
    messages_field: str = Field("messages", description="chat: field of a row that holds the list of {role, content} messages.")
    loss_on: Literal["all", "last"] = Field(
        "all", description="chat: which assistant turns are trained: `all` (OpenAI's default; a message's `weight: 0` leaves "
        "it out) or `last` (only the last reply; rows may then not mark an earlier turn `weight: 1`)."
    )
    max_new_tokens: int = Field(96, ge=1, le=2048, description="chat: longest reply generated, in tokens.")

    @model_validator(mode="after")
    def _no_text_field(self) -> ChatConfig:
        """``text_field`` (of every task section) names no input here: the conversation is the input, so another value
        would be silently ignored."""
        if self.text_field != "text":
            raise ValueError(f"text_field does not apply to task.type chat (got {self.text_field!r}): the whole conversation "
                             "is the input; name its field with messages_field")
        return self


class ChatTask(GenerateTask):
    """Scored like ``generate`` (the metrics, decoder and parsing are inherited); rows, prompts and training differ."""

    name = "chat"
    config = ChatConfig
    has_labels = False
    baselines: ClassVar[tuple[str, ...]] = base.PROMPTED  # `lead` (the input's first sentence) has no meaning for a conversation
    reads_chat_rows: ClassVar[bool] = True  # the data stage hands OpenAI chat rows over whole, not cut to the last user/assistant
    synth_refusal: ClassVar[str] = SYNTH_REFUSAL
    synth_alternative: ClassVar[str] = SYNTH_ALTERNATIVE

    cfg: ChatConfig  # type: ignore[assignment]

    # -- rows -------------------------------------------------------------------------------------
    @staticmethod
    def normalize(row: dict[str, Any], cfg: ChatConfig) -> tuple[Row | None, RowProblems]:
        problems = _tool_problems(row)
        if cfg.messages_field not in row:
            return None, [*problems, (f"missing field {cfg.messages_field!r}", f"keys {sorted(row)}")]
        raw = row[cfg.messages_field]
        if not isinstance(raw, list) or not raw:
            return None, [*problems, (f"field {cfg.messages_field!r} must be a non-empty list of {{role, content}} objects", raw)]
        turns = [_message(i, m, problems) for i, m in enumerate(raw)]
        problems += turn_order_problems([t["role"] if t else None for t in turns], last="assistant")
        if problems:
            return None, problems
        problems += _weight_problems(turns, cfg.loss_on)
        if problems:
            return None, problems
        *context, last = turns
        return {"text": transcript(context), "messages": context, "target": last["content"], "references": [last["content"]],
                "weight": last.get("weight", 1)}, []

    @staticmethod
    def normalize_input(row: dict[str, Any], cfg: ChatConfig) -> tuple[Row | None, RowProblems]:
        """For `microtune predict`: the conversation to answer. A row may end with the user turn to answer, or be a whole
        training row (its last assistant reply is dropped, so a test file is answered as eval scores it)."""
        problems = _tool_problems(row)
        raw = row.get(cfg.messages_field)
        if not isinstance(raw, list) or not raw:
            return None, [*problems, (f"field {cfg.messages_field!r} must be a non-empty list of {{role, content}} objects", raw)]
        turns = [_message(i, m, problems) for i, m in enumerate(raw)]
        if len(turns) > 1 and turns[-1] is not None and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        problems += turn_order_problems([t["role"] if t else None for t in turns], last="user")
        if problems:
            return None, problems
        context = [{"role": t["role"], "content": t["content"]} for t in turns if t is not None]
        return {"text": transcript(context), "messages": context}, []

    # -- prompts ----------------------------------------------------------------------------------
    def messages(self, example: dict[str, Any], *, label_list: bool = False,
                 shots: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
        """The conversation before the reply (the row's system message, or the instruction); shots join the system message."""
        turns = self._system_first([{"role": t["role"], "content": t["content"]} for t in example["messages"]])
        if shots:
            turns[0] = {"role": "system", "content": turns[0]["content"] + _shot_text(shots)}
        return turns

    def conversation(self, example: dict[str, Any]) -> list[dict[str, Any]]:
        """The whole conversation to train on: every assistant message carries ``weight`` 1 (trained) or 0, as
        ``task.loss_on`` and the row's weights say (``tasks.render.encode_example`` reads it)."""
        last = self.cfg.loss_on == "last"
        turns = [{"role": t["role"], "content": t["content"]} | ({"weight": 0 if last else t.get("weight", 1)} if t["role"] == "assistant" else {})
                 for t in example["messages"]]
        return [*self._system_first(turns), {"role": "assistant", "content": example["target"], "weight": 1 if last else example["weight"]}]

    def example_from_messages(self, messages: list[dict[str, str]]) -> Row:
        """A served request's conversation as an example (``serve`` passes the whole ``messages`` list): it must follow the
        turn order of a row, ending with the user turn to answer; ``ValueError`` says what is wrong."""
        turns = [{"role": "system" if m["role"] == "developer" else m["role"], "content": (m.get("content") or "").strip()}
                 for m in messages]
        problems = turn_order_problems([t["role"] for t in turns], last="user")
        problems += [(f"messages[{i}] ({t['role']}): empty content", t["content"]) for i, t in enumerate(turns) if not t["content"]]
        if problems:
            raise ValueError("; ".join(reason for reason, _ in problems))
        return {"text": transcript(turns), "messages": turns}

    def _system_first(self, turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The turns led by their own system message, or by the recipe's instruction when they have none."""
        return turns if turns and turns[0]["role"] == "system" else [{"role": "system", "content": self.cfg.instruction}, *turns]

    # -- synthetic data ---------------------------------------------------------------------------
    def synth(self) -> None:
        """``None``: see ``SYNTH_REFUSAL``; the recipe refuses a `synth` section for chat at check with it."""
        return None


def transcript(turns: Sequence[dict[str, Any]]) -> str:
    """The turns without the system message, one ``role: content`` line each: the text the dataset checks compare."""
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns if t["role"] != "system")


def _shot_text(shots: Sequence[dict[str, Any]]) -> str:
    shown = [f"{transcript(s['messages'])}\nassistant: {s['target']}" for s in shots]
    return "\n\nExample conversations, each ending with the reply that was expected:\n\n" + "\n\n".join(shown)


def _tool_problems(row: dict[str, Any]) -> RowProblems:
    """OpenAI rows may declare tools; a chat micro-model answers in text and never calls one, so such rows are refused."""
    return [(f"`{key}` is not supported: a chat micro-model answers in text and does not call tools; remove the key", row[key])
            for key in ("tools", "functions") if row.get(key)]


def _message(i: int, message: Any, problems: RowProblems) -> dict[str, Any] | None:
    """One message checked (role, content, weight); ``None`` when it is not a usable object."""
    if not isinstance(message, dict):
        problems.append((f"messages[{i}] is not a {{role, content}} object", message))
        return None
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        extra = " (tool and function messages are not supported: a chat micro-model does not call tools)" if role in ("tool", "function") else ""
        problems.append((f"messages[{i}]: unknown role {role!r}; use system, user or assistant{extra}", role))
        return None
    if message.get("tool_calls") or message.get("function_call"):
        problems.append((f"messages[{i}] ({role}): tool calls are not supported; a chat micro-model answers in text", role))
    if not isinstance(content, str):
        problems.append((f"messages[{i}] ({role}): content must be a string", content))
    elif not content.strip():
        problems.append((f"messages[{i}] ({role}): empty content", content))
    elif "\x00" in content:
        problems.append((f"messages[{i}] ({role}): content contains a NUL character (\\u0000): remove it", content[:60]))
    turn: dict[str, Any] = {"role": role, "content": content.strip() if isinstance(content, str) else ""}
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            problems.append((f"messages[{i}] ({role}): `weight` is only for assistant messages", weight))
        elif isinstance(weight, bool) or weight not in (0, 1):
            problems.append((f"messages[{i}] (assistant): weight must be 0 or 1", weight))
        else:
            turn["weight"] = int(weight)
    return turn


def turn_order_problems(roles: Sequence[str | None], last: str) -> RowProblems:
    """Turn-order problems of a conversation: an optional system message first, then user and assistant alternating from
    a user turn, ending with ``last`` (``assistant`` for a training row, ``user`` for a request to answer). ``None`` marks a
    message already reported as broken: it is skipped, so one bad message gives one problem."""
    problems: RowProblems = []
    seen = [r for r in roles if r is not None]
    prev: str | None = None
    for i, role in enumerate(roles):
        if role is None:
            continue
        if role == "system":
            if prev is not None:
                problems.append((f"messages[{i}]: a system message may only come first", seen))
            prev = prev or "system"
            continue
        if prev in (None, "system") and role != "user":
            problems.append((f"messages[{i}]: the conversation must start with a user message (after the optional system "
                             f"message), not {role}", seen))
        elif prev == role:
            problems.append((f"messages[{i}]: two {role} messages in a row; user and assistant turns must alternate", seen))
        prev = role
    if seen and seen[-1] != last:
        what = "the reply to train on" if last == "assistant" else "the turn to answer"
        problems.append((f"the conversation must end with a{'n' if last == 'assistant' else ''} {last} message ({what}), "
                         f"not {seen[-1]}", seen))
    return problems


def _weight_problems(turns: list[dict[str, Any]], loss_on: str) -> RowProblems:
    """OpenAI's ``weight`` against ``task.loss_on``: something must be trained, and ``last`` cannot honour a weight that
    asks otherwise (a silently dropped weight would train what the row says not to, or skip what it says to train)."""
    answers = [(i, t.get("weight")) for i, t in enumerate(turns) if t["role"] == "assistant"]
    if loss_on == "all":
        if all(w == 0 for _, w in answers):
            return [("every assistant message has weight 0: nothing to train on; give at least one weight 1", [w for _, w in answers])]
        return []
    problems: RowProblems = []
    last_i, last_w = answers[-1]
    if last_w == 0:
        problems.append((f"messages[{last_i}]: the last assistant message has weight 0, but task.loss_on: last trains only it; "
                         "set task.loss_on: all or remove the weight", 0))
    problems += [(f"messages[{i}]: weight 1 on an earlier assistant message, but task.loss_on: last trains only the last one; "
                  "set task.loss_on: all to train it, or remove the weight", 1) for i, w in answers[:-1] if w == 1]
    return problems
