"""Turn chat messages into token ids through the base model's chat template.

The completion (what receives loss, and what constrained decoding chooses among) is the answer
followed by the template's end-of-turn marker, tokenised the same way in training and inference:
``answer ids + end-of-turn ids``. The end-of-turn suffix is read off the template once with a probe.

An encoded example is ``(prompt_ids, completion_ids)``: loss on the completion only. A multi-turn conversation
(``encode_turns``, for a task with a ``conversation`` hook: ``chat``) is ``(prompt_ids, completion_ids, labels)``:
the prompt is the conversation before its last reply, and ``labels`` (one per token of prompt + completion, ``IGNORE``
where no loss goes) also marks the earlier assistant turns that are trained. ``labels_of`` gives the labels of
either shape, so training and the check's statistics read both alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from microtune.core.errors import ModelError

_PROBE = "\u2063PROBE\u2063"
IGNORE = -100  # the label of a token that gets no loss (PyTorch's cross-entropy ignore_index)
Encoded = tuple[list[int], list[int]] | tuple[list[int], list[int], list[int]]


def labels_of(example: Sequence[list[int]]) -> list[int]:
    """Per-token loss targets of an encoded example: its own ``labels``, or ``IGNORE`` on the prompt then the completion."""
    prompt, completion, *given = example
    return list(given[0]) if given else [IGNORE] * len(prompt) + list(completion)


def encode_example(task: Any, example: dict[str, Any], renderer: Renderer, max_len: int) -> Encoded:
    """How training (and the check's length statistics) encode an example: the task's whole ``conversation`` with
    its trained turns when the task has that hook (``chat``), else its prompt ``messages`` and ``target``."""
    conversation = getattr(task, "conversation", None)
    if conversation is not None:
        return renderer.encode_turns(conversation(example), max_len)
    return renderer.encode(task.messages(example), task.target(example), max_len)


class Renderer:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.suffix_ids = self._suffix_ids()
        self.stop_id = self.suffix_ids[-1] if self.suffix_ids else tokenizer.eos_token_id

    def _suffix_ids(self) -> list[int]:
        msgs = [{"role": "user", "content": "x"}]
        prompt = self.prompt_text(msgs)
        full = self.tok.apply_chat_template([*msgs, {"role": "assistant", "content": _PROBE}], tokenize=False)
        after = full[len(prompt):] if full.startswith(prompt) else full.split(_PROBE, 1)[-1]
        suffix = after.split(_PROBE, 1)[-1]
        ids = self.tok(suffix, add_special_tokens=False)["input_ids"]
        special = set(self.tok.all_special_ids)
        for i, tid in enumerate(ids):  # keep up to the first special token (the end-of-turn marker)
            if tid in special:
                return ids[: i + 1]
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok(self.prompt_text(messages), add_special_tokens=False)["input_ids"]

    def completion_ids(self, answer: str) -> list[int]:
        return self.tok(answer, add_special_tokens=False)["input_ids"] + self.suffix_ids

    def encode(self, messages: list[dict[str, str]], answer: str, max_len: int) -> tuple[list[int], list[int]]:
        """``(prompt_ids, completion_ids)`` cut to fit ``max_len``: the earliest exchanges of a multi-turn conversation
        go first (the system message stays), then the last user text is shortened."""
        completion = self.completion_ids(answer)
        prompt = self.prompt_ids(messages)
        while len(prompt) + len(completion) > max_len and _users(messages) > 1:
            messages = _drop_first_exchange(messages)
            prompt = self.prompt_ids(messages)
        overflow = len(prompt) + len(completion) - max_len
        if overflow > 0:
            text_ids = self.tok(messages[-1]["content"], add_special_tokens=False)["input_ids"]
            keep = max(len(text_ids) - overflow - 2, 1)
            short = self.tok.decode(text_ids[:keep])
            prompt = self.prompt_ids([*messages[:-1], {**messages[-1], "content": short}])[: max_len - len(completion)]
        return prompt, completion

    def encode_turns(self, turns: list[dict[str, Any]], max_len: int) -> tuple[list[int], list[int], list[int]]:
        """``(prompt_ids, completion_ids, labels)`` of a whole conversation whose assistant messages carry ``weight``
        1 (trained: its answer ids and end-of-turn marker get loss, as ``completion_ids`` gives them) or 0.

        The conversation ends at its last trained reply (nothing after it gets loss); when too long, its earliest
        exchanges go first, then the single-turn cut of ``encode`` applies to the one left. The ids are the template's
        text between the replies tokenised piece by piece, each reply exactly as the model generates it."""
        trained = [i for i, t in enumerate(turns) if t["role"] == "assistant" and t.get("weight", 1)]
        if not trained:
            raise ValueError("a conversation to train on needs an assistant message with weight 1")
        turns = turns[: trained[-1] + 1]
        ids, labels, start = self._turn_ids(turns)
        while len(ids) > max_len and _users(turns) > 1:
            turns = _drop_first_exchange(turns)
            ids, labels, start = self._turn_ids(turns)
        if len(ids) > max_len:
            prompt, completion = self.encode(_plain(turns[:-1]), turns[-1]["content"], max_len)
            return prompt, completion, [IGNORE] * len(prompt) + completion
        return ids[:start], ids[start:], labels

    def _turn_ids(self, turns: list[dict[str, Any]]) -> tuple[list[int], list[int], int]:
        """The ids and labels of ``turns`` (ending with an assistant message) and where the last reply starts."""
        plain, eot = _plain(turns), self.tok.decode(self.suffix_ids)
        ids: list[int] = []
        labels: list[int] = []
        done, start = "", 0  # done: the template text already turned into ids
        for k in [i for i, t in enumerate(turns) if t["role"] == "assistant"]:
            head = self.prompt_text(plain[:k])
            if not head.startswith(done):
                raise ModelError("the base model's chat template renders the earlier turns of a conversation differently "
                                 "once a later turn follows, so the turns to train cannot be located",
                                 hint="use a base model whose chat template only appends turns (ChatML, Llama 3, …) for task.type chat")
            between = self.tok(head[len(done):], add_special_tokens=False)["input_ids"]
            answer = self.completion_ids(plain[k]["content"])
            start = len(ids) + len(between)
            ids += between + answer
            labels += [IGNORE] * len(between) + (answer if turns[k].get("weight", 1) else [IGNORE] * len(answer))
            done = self._through_reply(plain[: k + 1], head, eot)
        return ids, labels, start

    def _through_reply(self, turns: list[dict[str, str]], head: str, eot: str) -> str:
        """The template text up to and including the end-of-turn marker of the reply that ends ``turns``."""
        full = self.tok.apply_chat_template(turns, tokenize=False)
        end = full.find(eot, len(head)) if eot and full.startswith(head) else -1
        if end < 0:
            raise ModelError("the base model's chat template does not end an assistant turn with a marker the tokenizer "
                             f"knows ({eot!r}), so the trained turns of a conversation cannot be located",
                             hint="use a base model whose chat template ends each turn with a special token, for task.type chat")
        return full[: end + len(eot)]


def _plain(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Messages as the chat template takes them (a ``weight`` is the trainer's, not the template's)."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _users(messages: Sequence[dict[str, Any]]) -> int:
    return sum(m["role"] == "user" for m in messages)


def _drop_first_exchange(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation without its first user turn and everything up to the next user turn (the system message stays)."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    following = next(i for i, m in enumerate(messages) if m["role"] == "user" and i > first)
    return [*messages[:head], *messages[following:]]
