"""An Ollama ``Modelfile`` for an exported GGUF: the chat template in Ollama's Go-template syntax, stop tokens, SYSTEM.

    text = modelfile("toy.gguf", tokenizer, system="Route the customer message.", labels=["billing", "shipping"])

Ollama does not run Jinja, so the base's chat template is translated — not by parsing Jinja, but by probing
it: the template is rendered with marker messages to read off, per role, the text before and after a
message's content, the generation prompt and the system block it adds when there is none (SmolLM2's
"You are a helpful AI assistant named SmolLM…"). The pieces are then checked by re-rendering several
conversations both ways; a template that is not "a fixed wrapper per role" (most chat models' are, ChatML
included) fails that check, and the Modelfile then carries no TEMPLATE (Ollama falls back to matching the
GGUF's ``tokenizer.chat_template`` against the templates it knows) and says so in a comment.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from microtune.core.errors import InputError

ROLES = ("system", "user", "assistant")
_MARK = {role: f"\u2063{role.upper()}\u2063" for role in ROLES}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatPieces:
    """A chat template that wraps each message in fixed text: ``before[role] + content + after[role]``."""

    before: dict[str, str]
    after: dict[str, str]
    generation: str  # appended after the messages when the model is to answer
    default_system: str  # rendered before the first message when there is no system message

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        head = "" if messages and messages[0]["role"] == "system" else self.default_system
        body = "".join(self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages)
        return head + body + self.generation


def chat_pieces(tokenizer: Any) -> ChatPieces | None:
    """The template as per-role wrappers, or None when it is not one (checked on several conversations)."""
    def render(messages: list[dict[str, str]], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def msg(role: str, content: str | None = None) -> dict[str, str]:
        return {"role": role, "content": _MARK[role] if content is None else content}

    try:
        convo = [msg("system"), msg("user"), msg("assistant")]
        after, before, done = {}, {}, ""
        for i, m in enumerate(convo):  # each message's tail: what the template adds after it when it is the last one
            text = render(convo[: i + 1])
            head, _, after[m["role"]] = text.rpartition(m["content"])
            if not head.startswith(done):
                return None
            before[m["role"]] = head[len(done):]
            done = text
        generation = render(convo[:2], True)[len(render(convo[:2])):]
        alone = render([msg("user")])
        default_system = alone[: len(alone) - len(before["user"] + _MARK["user"] + after["user"])]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # a template that refuses these conversations (e.g. one that demands alternating turns differently)
    pieces = ChatPieces(before, after, generation, default_system)
    return pieces if _agrees(pieces, render) else None


def _agrees(pieces: ChatPieces, render: Any) -> bool:
    """The pieces rebuild the template's own output on conversations they were not read from."""
    probes = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "q2"}],
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
    ]
    try:
        return all(pieces.render(p) == render(p, True) and pieces.render(p)[: -len(pieces.generation) or None] == render(p)
                   for p in probes)
    except (ValueError, TypeError, KeyError):
        return False


def go_template(pieces: ChatPieces) -> str:
    """The pieces as an Ollama template. Literal text goes through ``{{ "…" }}`` so that no whitespace trimming or
    Go-template syntax inside the pieces can change it; chat requests use ``.Messages`` (Ollama puts the Modelfile's
    SYSTEM first when a request has none), plain generate requests ``.System``/``.Prompt``."""
    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    def wrap(role: str, content: str) -> str:
        return lit(pieces.before[role]) + "{{ " + content + " }}" + lit(pieces.after[role])

    roles = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{wrap(role, ".Content")}'
                    for i, role in enumerate(ROLES))
    default = f'{{{{ if ne (index .Messages 0).Role "system" }}}}{lit(pieces.default_system)}{{{{ end }}}}' \
        if pieces.default_system else ""
    messages = f"{default}{{{{ range .Messages }}}}{roles}{{{{ end }}}}{{{{ end }}}}{lit(pieces.generation)}"
    system = f'{{{{ if .System }}}}{wrap("system", ".System")}' + \
        (f"{{{{ else }}}}{lit(pieces.default_system)}" if pieces.default_system else "") + "{{ end }}"
    prompt = f'{{{{ if .Prompt }}}}{wrap("user", ".Prompt")}{{{{ end }}}}{lit(pieces.generation)}'
    return f"{{{{- if .Messages -}}}}\n{messages}\n{{{{- else -}}}}\n{system}{prompt}\n{{{{- end }}}}"


def modelfile(gguf_name: str, tokenizer: Any, *, stops: Sequence[str], system: str | None, title: str,
              labels: Sequence[str] | None = None) -> str:
    """The Modelfile text: FROM the GGUF next to it, TEMPLATE, PARAMETERs, SYSTEM and, for a label task, the labels."""
    lines = [f"# {title}", "# Written by `microtune export --gguf`. Load it with:  ollama create NAME -f Modelfile", "",
             f"FROM ./{gguf_name}"]
    pieces = chat_pieces(tokenizer)
    if pieces is not None:
        lines += [f'TEMPLATE """{_quoted(go_template(pieces), "TEMPLATE")}"""']
    else:
        log.warning("the chat template is not a fixed wrapper per role; the Modelfile has no TEMPLATE, so Ollama picks one "
                    "from the GGUF's tokenizer.chat_template: check `ollama show NAME --template`")
        lines += ["# No TEMPLATE: the chat template could not be translated to Ollama's syntax (it is not a fixed wrapper",
                  "# per role); Ollama matches the GGUF's tokenizer.chat_template against the templates it knows."]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)]
    lines += ["# microtune eval decodes greedily: the same answers need temperature 0", "PARAMETER temperature 0"]
    if system:
        lines += [f'SYSTEM """{_quoted(system, "SYSTEM (the task instruction)")}"""']
    if labels:
        lines += ["", f"# Answers: one of these {len(labels)} labels (Ollama does not restrict the output to them; microtune",
                  "# serve and eval do):"] + [f"#   {label}" for label in labels]
    return "\n".join(lines) + "\n"


def _quoted(text: str, what: str) -> str:
    if '"""' in text:  # a Modelfile's triple-quoted value has no escapes: it would end early
        raise InputError(f'the Modelfile {what} contains """, which a Modelfile cannot quote',
                         hint='remove """ from the recipe\'s task instruction, or write the Modelfile by hand')
    return text
