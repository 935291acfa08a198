"""Per-row decoding constraints: a JSON object that follows a schema (extract's answer), or any JSON object.

    c = json_schema(schema, tokenizer, stop_ids={renderer.stop_id})   # one per row; the grammar is compiled once
    c.mask(logits_row, remaining)   # in place: tokens the grammar refuses → -inf
    c.advance(token); c.is_done()

Built on llguidance (see BENCHMARKS.md, "Constrained JSON decoding", for why it over xgrammar, outlines-core
and lm-format-enforcer): a Rust matcher per row, so rows of one batch can each follow their own schema (or
none). The JSON is compact with ``json.dumps``' separators (``", "``, ``": "``) and keys in schema order —
the form extract's training targets have — and strings take no ``\\u`` escapes (non-ASCII is written
as is, as the targets are). Once the object is complete the only token allowed is the end of turn, and
the constraint reports itself done.

Valid by construction, also at ``max_new_tokens``: each mask call is told how many tokens the row has
left; when that is no more than what closing the object may take (open strings, arrays, objects, the
required keys still missing: an upper bound in tokens, plus what one more token could open), the row stops writing and closes: the
grammar's forced continuation where it has one (a key), else the shortest closer the grammar accepts
(``"``, ``]``, ``}``, ``null``, ``,``). A row therefore ends with a parseable object whatever the model,
even a random one; only a budget smaller than the smallest valid object can fail (then the answer is
cut, as unconstrained text would be).
"""
from __future__ import annotations

import functools
import json
import threading
import weakref
from typing import Any, Protocol, runtime_checkable

SEPARATORS = (", ", ": ")  # json.dumps' defaults: extract's training targets use them
ESCAPES = '"\\bfnrt'  # no \\uXXXX: targets keep non-ASCII characters as they are (ensure_ascii=False)
GROWTH = 8  # the most one token may add to the closing cost (its own openers: `": ["` …), kept in reserve


@runtime_checkable
class Constraint(Protocol):
    """What the generator asks of a row's constraint, once per generated token."""

    def mask(self, logits: Any, remaining: int | None = None) -> None:
        """Set the logits (one row, ``[vocab]``) of every token not allowed next to -inf, in place.
        ``remaining``: tokens the row may still generate, this one included (to finish in time)."""

    def advance(self, token: int) -> None:
        """Take the chosen token."""

    def is_done(self) -> bool:
        """The answer is complete: the generator stops the row (finish reason ``stop``)."""


class _Tokenizer:
    """llguidance's view of one tokenizer with given stop ids (~0.3 s for a 49k vocabulary: built once), and the
    token ids the closing step uses."""

    def __init__(self, tok: Any, stop_ids: tuple[int, ...]):
        import llguidance.hf

        self.vocab = len(tok)
        self.ll = llguidance.hf.from_tokenizer(tok, n_vocab=self.vocab, eos_token=list(stop_ids))
        self.stop_ids = stop_ids
        self.text = functools.lru_cache(maxsize=None)(lambda t: self.ll.decode_bytes([t]).decode("utf-8", "replace"))
        self.piece = {s: self._single(tok, s) for s in ('"', "]", "}", ",", "null", "{", ":", "n", " null", ' "', " {")}
        self.lock = threading.Lock()
        self.grammars: dict[str, Any] = {}  # grammar text → a fresh matcher to copy (compiled once)

    @staticmethod
    def _single(tok: Any, text: str) -> int | None:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    def key_cost(self, key: str) -> int:
        """Tokens a missing key takes to close with (``, "key": null``), plus one spare: the grammar's forced
        tokenisation may split differently from the tokenizer's."""
        return len(self.ll.tokenize_str(f'{SEPARATORS[0]}"{key}"{SEPARATORS[1]}null')) + 1

    def matcher(self, grammar: str) -> Any:
        import llguidance

        with self.lock:
            proto = self.grammars.get(grammar)
            if proto is None:
                proto = llguidance.LLMatcher(self.ll, grammar, log_level=0)
                if proto.is_error():
                    raise ValueError(f"the JSON schema cannot be compiled to a grammar: {proto.get_error()}")
                self.grammars[grammar] = proto
        return proto.deep_copy()


_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], _Tokenizer]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _tokenizer(tok: Any, stop_ids: Any) -> _Tokenizer:
    key = tuple(sorted(int(s) for s in stop_ids))
    if not key:
        raise ValueError("a JSON constraint needs the end-of-turn token id(s) to force once the object is complete")
    with _LOCK:
        per_tok = _TOKENIZERS.setdefault(tok, {})
        if key not in per_tok:
            per_tok[key] = _Tokenizer(tok, key)
        return per_tok[key]


@functools.lru_cache(maxsize=64)
def _grammar(schema_text: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(
        schema_text, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1],
                               "json_allowed_escapes": ESCAPES})


def json_schema(schema: dict[str, Any], tokenizer: Any, stop_ids: Any) -> JsonConstraint:
    """A constraint to one JSON value following ``schema`` (an object schema for extract), then the end of turn."""
    text = json.dumps(schema)  # not sorted: the property order is the order keys are written in
    required = list(schema.get("required") or []) if schema.get("type") == "object" else []
    tok = _tokenizer(tokenizer, stop_ids)
    return JsonConstraint(tok, _grammar(text), {k: tok.key_cost(k) for k in required})


def json_object(tokenizer: Any, stop_ids: Any) -> JsonConstraint:
    """Any JSON object (an OpenAI ``response_format: {"type": "json_object"}``)."""
    return json_schema({"type": "object"}, tokenizer, stop_ids)


class JsonTail:
    """Where a JSON text stands, enough to say what closing it costs and which closer comes next.

    A small scanner over the generated text (the grammar has checked it): the open containers, whether a
    string (and an escape) is open, what the innermost container expects next, and the top-level keys written.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" / "["
        self.expect = "value"  # value | key | colon | comma (after a value) | done
        self.in_string = self.escape = self.is_key = False
        self.key = ""
        self.keys: set[str] = set()  # keys of the top-level object

    def feed(self, text: str) -> None:
        for ch in text:
            self._char(ch)

    def _char(self, ch: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.is_key:
                    if len(self.stack) == 1:
                        self.keys.add(self.key)
                    self.expect = "colon"
                else:
                    self._value_done()
            elif self.is_key:
                self.key += ch
            return
        if ch in " \t\r\n":
            return
        if ch in "{[":
            self.stack.append(ch)
            self.expect = "key" if ch == "{" else "value"
        elif ch in "}]":
            if self.stack:
                self.stack.pop()
            self._value_done()
        elif ch == '"':
            self.in_string, self.is_key, self.key = True, self.expect == "key", ""
        elif ch == ":":
            self.expect = "value"
        elif ch == ",":
            self.expect = "key" if self.stack and self.stack[-1] == "{" else "value"
        elif self.expect == "value":  # a literal or number starts: count it as written
            self._value_done()

    def _value_done(self) -> None:
        self.expect = "comma" if self.stack else "done"

    def closing_cost(self, required: dict[str, int]) -> int:
        """Tokens that close the text, at most: escape, string, a value where one is due, the closers, the required
        top-level keys still missing (``required``: key → tokens of ``, "key": null``, with a spare one), the end of turn."""
        cost = int(self.escape) + int(self.in_string) + (2 if self.expect in ("value", "colon") else 0) + len(self.stack) + 1
        if self.expect == "colon":
            cost += 1
        if self.stack:
            cost += sum(n for k, n in required.items() if k not in self.keys)
        elif self.expect == "value":  # nothing written yet: the whole smallest object
            cost += 2 + sum(required.values())
        return cost

    def closers(self) -> list[str]:
        """Closing pieces to try in order (the first the grammar accepts is taken)."""
        if self.in_string:
            return ["n"] if self.escape else ['"']
        if self.expect == "value":  # after a separator the space may still be due: it goes with the value's first token
            return [" null", "null", ' "', '"', " {", "{"] if self.stack else ["{"]
        if self.expect == "colon":
            return [":"]
        if self.expect == "key":
            return ["}", '"']
        inner = self.stack[-1] if self.stack else ""
        return ["}", ","] if inner == "{" else ["]", ","]


class JsonConstraint:
    """One row's JSON matcher (llguidance), closing the object in time when the token budget runs out."""

    def __init__(self, tok: _Tokenizer, grammar: str, required: dict[str, int]):
        self.tok, self.matcher, self.required = tok, tok.matcher(grammar), required
        self.tail = JsonTail()

    def is_done(self) -> bool:
        return self.matcher.is_stopped()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} is not allowed by the JSON grammar here: {self.matcher.get_error()}")
        if token not in self.tok.stop_ids:
            self.tail.feed(self.tok.text(token))

    def allowed(self) -> Any:
        """The boolean mask of allowed next tokens over the tokenizer's vocabulary (llguidance fills a bitmask)."""
        import numpy as np
        import torch

        words = np.full((self.tok.vocab + 31) // 32, -1, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        return torch.from_numpy(np.unpackbits(words.view(np.uint8), bitorder="little")[: self.tok.vocab].view(np.bool_))

    def mask(self, logits: Any, remaining: int | None = None) -> None:
        allowed = self.allowed()
        if remaining is not None and remaining <= self.tail.closing_cost(self.required) + GROWTH:
            forced = self._closer(allowed)
            if forced is not None:
                allowed = allowed.new_zeros(allowed.shape)
                allowed[forced] = True
        n = min(self.tok.vocab, logits.shape[-1])
        logits[:n].masked_fill_(~allowed[:n].to(logits.device), float("-inf"))
        logits[n:] = float("-inf")  # embedding rows past the tokenizer's vocabulary are never a token

    def _closer(self, allowed: Any) -> int | None:
        """The token that closes fastest from here: the grammar's forced continuation, else the first allowed closer."""
        forced = self.matcher.compute_ff_tokens()
        if forced:
            return forced[0]
        for piece in self.tail.closers():
            tid = self.tok.piece.get(piece)
            if tid is not None and bool(allowed[tid]):
                return tid
        return None
