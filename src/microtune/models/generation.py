"""Continuous-batching text generation: requests join and leave a running batch, each with its own limits.

    gen = BatchGenerator(model, pad_id, bf16=False, max_batch=32)
    done = gen.run([GenRequest(prompt=ids, max_new_tokens=80, stop_ids={eot}, constraint=json_schema(...))])
    # or, driven by a server: h = gen.add(req); while gen.has_work: for f in gen.step(): ...

One ``step`` prefills the requests admitted since the last one (one left-padded forward), merges their KV
cache into the running batch (the shorter side padded on the left, so every row ends at the same column),
picks one token for every row (greedy, or sampled with the row's own seeded ``torch.Generator``, after the
row's constraint masks its logits), and runs one forward for all rows still going. A row leaves at its own
end — a stop id, a stop string, its constraint complete (``stop``), ``max_new_tokens`` (``length``) or
its ``cancelled`` flag (``cancelled``) — and its KV rows go with it (the cache's batch_select_indices),
so a long answer never holds the others back. Positions count each row's own tokens, so a row's greedy
answer is the one ``model.generate`` gives it alone.

Mixed-adapter batches: a request's ``adapter`` names its PEFT adapter (``"__base__"``: none); the forward
gets PEFT's per-row ``adapter_names``. Prompt/prefix-tuned models get their virtual tokens from PEFT's
forward and cannot continue an external left-padded KV cache, and sliding-window attention keeps only
its window in the cache (no row-wise padding and merging): for these each step recomputes every row from
its tokens (right-padded, no cache) — slower, same answers.

Streaming: ``on_text`` receives the text as it grows, decoded incrementally (a multi-byte character is
sent once complete) and held back while it could still be the start of a stop string.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from microtune.models.compat import cache_kwarg, cache_of, kv_layers, last_logits_only, set_kv_layers, uses_sliding_window
from microtune.models.constrain import Constraint, json_schema
from microtune.models.decoding import _uses_virtual_tokens, padded
from microtune.models.hardware import autocast, device
from microtune.tasks.render import Renderer

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class GenRequest:
    """One generation: the prompt's token ids and how to end, sample, constrain and stream the answer."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: set[int] = field(default_factory=set)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # a seeded sampled answer is the same whatever else is in the batch
    stop_strings: list[str] = field(default_factory=list)
    constraint: Constraint | None = None
    adapter: str | None = None  # PEFT adapter of this row in a mixed batch; None: a plain/single-adapter model
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False  # set by the owner: the row leaves at the next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Finished:
    request: GenRequest
    ids: list[int]  # generated token ids, the stop id included when one ended the row
    text: str  # the answer: special tokens skipped, cut before a stop string
    finish_reason: str  # stop | length | cancelled


class _Text:
    """Incremental detokenisation with stop strings: what may be streamed now, and the final text."""

    def __init__(self, tok: Any, stops: Sequence[str]):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> None:
        """Decode a window of the last tokens: text is added only once it does not end in a partial character."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        self._cut()

    def _cut(self) -> None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def ready(self) -> str:
        """New text safe to stream: none of it could turn into the start of a stop string."""
        hold = 0 if self.stopped else max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.sent: len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def finish(self) -> str:
        """The whole answer (a trailing partial character included) and the rest of the stream."""
        if not self.stopped:
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
            self._cut()
        self.sent = min(self.sent, len(self.text))
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return rest


@dataclass(eq=False)
class _Row:
    req: GenRequest
    text: _Text
    rng: Any
    ids: list[int] = field(default_factory=list)
    pos: int = 0  # the position id of the next token (the row's own token count)


class BatchGenerator:
    """Rows join (``add``) and leave (at their own end) a running batch; ``step`` advances every row one token."""

    def __init__(self, model: Any, pad_id: int, bf16: bool = False, max_batch: int = 32, tokenizer: Any = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.model, self.pad, self.bf16, self.max_batch = model, pad_id, bf16, max_batch
        self.tok = tokenizer
        self.cached = not (_uses_virtual_tokens(model) or uses_sliding_window(model))
        self.cache_kw, self.head_kw = cache_kwarg(model), last_logits_only(model)
        self.waiting: deque[_Row] = deque()
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, columns] 1 where the cache holds a real token
        self.logits: Any = None  # [rows, vocab] the next-token scores of every running row

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, req: GenRequest) -> GenRequest:
        """Queue a request (admitted at the next ``step``); the request is its own handle (``cancel()``)."""
        import torch

        _check(req)
        named = req.adapter is not None
        if any((r.req.adapter is not None) != named for r in [*self.rows, *self.waiting]):
            raise ValueError("a batch mixes requests with and without an adapter name: in a mixed-adapter batch every "
                             f"request names its adapter ({BASE_ADAPTER!r} for the base model)")
        if self.tok is None and (req.on_text is not None or req.stop_strings):
            raise ValueError("streaming text and stop strings need the tokenizer: BatchGenerator(..., tokenizer=tok)")
        rng = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        self.waiting.append(_Row(req, _Text(self.tok, req.stop_strings) if self.tok is not None else None, rng))  # type: ignore[arg-type]
        return req

    def run(self, requests: Sequence[GenRequest]) -> list[Finished]:
        """Every request to its end, results in request order (admitted shortest prompt first: less padding)."""
        for req in sorted(requests, key=lambda r: len(r.prompt)):
            self.add(req)
        done: dict[int, Finished] = {}
        while self.has_work:
            done.update((id(f.request), f) for f in self.step())
        return [done[id(r)] for r in requests]

    def step(self) -> list[Finished]:
        """Admit waiting rows, pick one token for every row, let finished rows go, run the next forward."""
        import torch

        finished = self._drop_cancelled_waiting()
        self.model.eval()
        with torch.no_grad(), autocast(self.bf16):
            new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.rows)))]
            if self.cached and new:
                self._prefill(new)
            else:
                self.rows += new
            if not self.rows:
                return finished
            if not self.cached:
                self.logits = self._recompute()
            keep = []
            for i, row in enumerate(self.rows):
                reason = "cancelled" if row.req.cancelled else self._advance(row, self.logits[i])
                if reason is None:
                    keep.append(i)
                else:
                    finished.append(self._finish(row, reason))
            self._keep(keep)
            if self.rows and self.cached:
                self._decode()
        return finished

    # -- one row ----------------------------------------------------------------------------------
    def _advance(self, row: _Row, scores: Any) -> str | None:
        """Choose the row's next token; the finish reason when the row ends with it."""
        req = row.req
        scores = scores.float().clone()
        if req.constraint is not None:
            req.constraint.mask(scores, req.max_new_tokens - len(row.ids))
        token = _choose(scores, req.temperature, req.top_p, row.rng)
        row.ids.append(token)
        if token in req.stop_ids:
            return "stop"
        if req.constraint is not None:
            req.constraint.advance(token)
        if row.text is not None:
            row.text.push(token)
            if req.on_text is not None and (piece := row.text.ready()):
                req.on_text(piece)
            if row.text.stopped:
                return "stop"
        if req.constraint is not None and req.constraint.is_done():
            return "stop"
        return "length" if len(row.ids) >= req.max_new_tokens else None

    def _finish(self, row: _Row, reason: str) -> Finished:
        if row.text is None:
            return Finished(row.req, row.ids, "", reason)
        rest = row.text.finish()
        if rest and row.req.on_text is not None:
            row.req.on_text(rest)
        return Finished(row.req, row.ids, row.text.text, reason)

    def _drop_cancelled_waiting(self) -> list[Finished]:
        gone = [r for r in self.waiting if r.req.cancelled]
        if gone:
            self.waiting = deque(r for r in self.waiting if not r.req.cancelled)
        return [Finished(r.req, [], "", "cancelled") for r in gone]

    # -- the batch --------------------------------------------------------------------------------
    def _adapters(self, rows: Sequence[_Row]) -> dict[str, Any]:
        """PEFT's per-row adapter argument; absent for a plain or single-adapter model (it would reject the kwarg)."""
        names = [r.req.adapter for r in rows]
        return {} if all(n is None for n in names) else {"adapter_names": names}

    def _prefill(self, new: list[_Row]) -> None:
        """One left-padded forward over the new prompts; their KV joins the running cache, their scores the batch's."""
        import torch

        ids, mask = padded([r.req.prompt for r in new], self.pad, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = device()
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                         **self._adapters(new), **self.head_kw)
        for r in new:
            r.pos = len(r.req.prompt)
        logits = out.logits[:, -1, :]
        if not self.rows:
            self.cache, self.mask, self.logits = cache_of(out), mask, logits
        else:
            self.cache, self.mask = _merge(self.cache, self.mask, cache_of(out), mask)
            self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)], dim=0)
        self.rows += new

    def _decode(self) -> None:
        """One forward of every running row's last token against the cache."""
        import torch

        last = torch.tensor([[r.ids[-1]] for r in self.rows])
        pos = torch.tensor([[r.pos] for r in self.rows])
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        dev = device()
        out = self.model(input_ids=last.to(dev), attention_mask=self.mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                         **{self.cache_kw: self.cache}, **self._adapters(self.rows))
        self.cache, self.logits = cache_of(out), out.logits[:, -1, :]
        for r in self.rows:
            r.pos += 1

    def _recompute(self) -> Any:
        """Next-token scores of every row by a full forward (right-padded, no cache): prompt/prefix-tuned models."""
        import torch

        seqs = [r.req.prompt + r.ids for r in self.rows]
        ids, mask = padded(seqs, self.pad, left=False)
        dev = device()
        logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **self._adapters(self.rows)).logits
        offset = logits.shape[1] - ids.shape[1]  # prompt tuning prepends its virtual tokens to the output
        return torch.stack([logits[i, offset + len(s) - 1] for i, s in enumerate(seqs)])

    def _keep(self, keep: list[int]) -> None:
        """Only the rows at ``keep`` go on: drop the others' cache rows and the columns no remaining row uses."""
        import torch

        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.cached:
            return
        if not keep:
            self.cache = self.mask = self.logits = None
            return
        index = torch.tensor(keep)
        self.mask, self.logits = self.mask[index], self.logits[index.to(self.logits.device)]
        self.cache.batch_select_indices(index.to(device()))
        start = int(self.mask.any(dim=0).long().argmax())  # the first column a remaining row uses
        if start:
            self.mask = self.mask[:, start:]
            set_kv_layers(self.cache, [(k[:, :, start:], v[:, :, start:]) for k, v in kv_layers(self.cache)])


def _merge(cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
    """The running cache with the new rows appended below, the shorter side padded on the left (masked out)."""
    import torch

    width = max(mask.shape[1], new_mask.shape[1])

    def pad(t: Any, cols: int) -> Any:  # [b, heads, L, d] → [b, heads, L + cols, d], zeros on the left
        return t if cols == 0 else torch.cat([t.new_zeros((*t.shape[:2], cols, t.shape[3])), t], dim=2)

    a, b = width - mask.shape[1], width - new_mask.shape[1]
    layers = [(torch.cat([pad(k, a), pad(nk.to(k.dtype), b)]), torch.cat([pad(v, a), pad(nv.to(v.dtype), b)]))
              for (k, v), (nk, nv) in zip(kv_layers(cache), kv_layers(new_cache))]
    set_kv_layers(cache, layers)
    merged = torch.cat([torch.nn.functional.pad(mask, (a, 0)), torch.nn.functional.pad(new_mask, (b, 0))])
    return cache, merged


def _choose(scores: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Greedy at temperature 0; else a sample from the temperature-scaled, top-p-truncated distribution."""
    import torch

    if temperature <= 0:
        return int(scores.argmax())
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # the tokens after the nucleus (the first always stays)
        probs = probs.scatter(0, order, sorted_p.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=rng))


def _check(req: GenRequest) -> None:
    """A request the generator cannot honour fails at ``add``, saying what came in."""
    if not req.prompt:
        raise ValueError("GenRequest.prompt is empty: give at least one token id")
    if req.max_new_tokens < 1:
        raise ValueError(f"GenRequest.max_new_tokens must be >= 1 (got {req.max_new_tokens})")
    if req.temperature < 0:
        raise ValueError(f"GenRequest.temperature must be >= 0 (got {req.temperature})")
    if not 0 < req.top_p <= 1:
        raise ValueError(f"GenRequest.top_p must be in (0, 1] (got {req.top_p})")


class TextGenerator:
    """Eval's free-text predictor over ``BatchGenerator``: greedy, to the end of turn or ``max_new_tokens``; with a
    ``schema`` each answer is a JSON object following it. Returns ``(text, None)`` pairs — the shape of LabelPredictor's."""

    def __init__(self, model: Any, renderer: Renderer, max_new_tokens: int, batch_size: int = 16, bf16: bool = False,
                 schema: dict[str, Any] | None = None):
        self.model, self.renderer, self.schema = model, renderer, schema
        self.max_new_tokens, self.batch_size, self.bf16 = max_new_tokens, batch_size, bf16
        tok = renderer.tok
        self.stops = {t for t in (renderer.stop_id, tok.eos_token_id) if t is not None}
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else min(self.stops)

    def predict(self, prompts: Sequence[list[int]]) -> list[tuple[str, None]]:
        gen = BatchGenerator(self.model, self.pad, self.bf16, self.batch_size, tokenizer=self.renderer.tok)
        done = gen.run([self._request(p) for p in prompts])
        return [(f.text.strip(), None) for f in done]

    def _request(self, prompt: list[int]) -> GenRequest:
        constraint = json_schema(self.schema, self.renderer.tok, self.stops) if self.schema is not None else None
        return GenRequest(list(prompt), self.max_new_tokens, set(self.stops), constraint=constraint)
