"""Constrained, batched prediction for classification: every answer is a valid label with a probability.

    predictor = LabelPredictor(model, renderer, labels, batch_size=16, bf16=True)
    preds = predictor.predict(list_of_prompt_ids)      # [(label, probability), ...]

How it is fast: prompts of one system share a long prefix (instruction, label list, few-shot turns);
its KV cache is computed once and copied into every batch, so each example costs only its own
tokens. Decoding walks a token trie of the label completions (label + end-of-turn), one forward pass
for the whole batch per step, and stops as soon as every row's label is decided (the remaining tokens
are forced); logits outside the trie are masked, so no step can leave the label set. The probability
is the product of the per-step probabilities renormalised over the allowed tokens.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from microtune.models.compat import cache_kwarg, cache_of, last_logits_only
from microtune.models.hardware import autocast, device
from microtune.tasks.render import Renderer

END = -1  # trie key marking a finished label


def build_trie(sequences: dict[str, list[int]]) -> dict[int, Any]:
    root: dict[int, Any] = {}
    for label, seq in sequences.items():
        node = root
        for tok in seq:
            node = node.setdefault(tok, {})
        node[END] = label
    return root


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by all prompts, leaving each at least one own token."""
    if not prompts:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _uses_virtual_tokens(model: Any) -> bool:
    """Prompt/prefix-tuned models get their virtual tokens from PEFT's forward: no external KV cache."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def settle(node: dict[int, Any]) -> dict[int, Any]:
    """The terminal node when only one label can follow ``node`` (a single chain of tokens to END), else ``node``.

    Every forced token has probability 1 once renormalised over the allowed set, so a row whose label is
    already decided needs no further forward passes: decoding stops as soon as each row's label is
    unambiguous (often after its first token), not after the label's last token.
    """
    n = node
    while END not in n and len(n) == 1:
        n = next(iter(n.values()))
    return n if END in n and len(n) == 1 else node


def _choose(scores: Any, node: dict[int, Any]) -> tuple[int, float]:
    """The best allowed next token of a trie node and its log-probability renormalised over the allowed set."""
    import torch

    allowed = torch.tensor([t for t in node if t != END])
    lp = torch.log_softmax(scores[allowed], dim=-1)
    best = int(lp.argmax())
    return int(allowed[best]), float(lp[best])


class LabelPredictor:
    def __init__(self, model: Any, renderer: Renderer, labels: Sequence[str], batch_size: int = 16, bf16: bool = False,
                 share_prefix: bool = True):
        self.model, self.renderer = model, renderer
        self.cached = not _uses_virtual_tokens(model)
        self.share_prefix = share_prefix and self.cached
        self.cache_kw = cache_kwarg(model)
        self.head_kw = last_logits_only(model)
        self.trie = build_trie({label: renderer.completion_ids(label) for label in labels})
        self.batch_size, self.bf16 = batch_size, bf16
        self.pad = renderer.tok.pad_token_id

    def predict(self, prompts: Sequence[list[int]]) -> list[tuple[str, float]]:
        import torch

        self.model.eval()
        p = common_prefix(prompts) if self.share_prefix else 0
        out: list[tuple[str, float] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with torch.no_grad(), autocast(self.bf16):
            prefix_cache = self._prefix_cache(prompts[0][:p]) if p else None
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                preds = self._decode([prompts[i][p:] for i in idx], p, prefix_cache) if self.cached \
                    else self._decode_uncached([list(prompts[i]) for i in idx])
                for i, pred in zip(idx, preds):
                    out[i] = pred
        return out  # type: ignore[return-value]

    def _prefix_cache(self, prefix: list[int]) -> Any:
        import torch

        ids = torch.tensor([prefix], device=device())
        return cache_of(self.model(input_ids=ids, use_cache=True, **self.head_kw))

    def _decode(self, suffixes: list[list[int]], p: int, prefix_cache: Any) -> list[tuple[str, float]]:
        import torch

        b, width = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.full((b, width), self.pad, dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        for row, s in enumerate(suffixes):  # left-pad the suffixes so every row ends at the same column
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, p + width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(b)
        nodes = [self.trie] * b
        logprob = [0.0] * b
        next_pos = pos[:, -1:] + 1
        dev = device()
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         use_cache=True, **{self.cache_kw: cache}, **self.head_kw)
        while True:
            scores = out.logits[:, -1, :].float()
            step = torch.full((b,), self.pad, dtype=torch.long)
            for row in range(b):
                if END in nodes[row]:
                    continue
                tok, lp = _choose(scores[row], nodes[row])
                logprob[row] += lp
                nodes[row], step[row] = settle(nodes[row][tok]), tok
            if all(END in n for n in nodes):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            out = self.model(input_ids=step[:, None].to(dev), attention_mask=mask.to(dev), position_ids=next_pos.to(dev),
                             use_cache=True, **{self.cache_kw: cache_of(out)})
            next_pos = next_pos + 1
        return [(n[END], float(torch.tensor(lp).exp())) for n, lp in zip(nodes, logprob)]

    def _decode_uncached(self, seqs: list[list[int]]) -> list[tuple[str, float]]:
        """Trie decoding by full forwards (right-padded, no KV cache): for prompt/prefix-tuned adapters."""
        import torch

        nodes, logprob, dev = [self.trie] * len(seqs), [0.0] * len(seqs), device()
        while not all(END in n for n in nodes):
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            offset = logits.shape[1] - width  # prompt tuning prepends its virtual tokens to the output
            for row, s in enumerate(seqs):
                if END not in nodes[row]:
                    tok, lp = _choose(logits[row, offset + len(s) - 1], nodes[row])
                    logprob[row] += lp
                    nodes[row] = settle(nodes[row][tok])
                    s.append(tok)
        return [(n[END], float(torch.tensor(lp).exp())) for n, lp in zip(nodes, logprob)]


class TextGenerator:
    """Batched greedy generation for free-text answers (``extract``, ``generate``): deterministic, KV-cached.

    Prompts are sorted by length and left-padded per batch (less padding); generation stops at the chat
    template's end-of-turn token or EOS. Returns ``(text, None)`` pairs — the shape of LabelPredictor's.
    """

    def __init__(self, model: Any, renderer: Renderer, max_new_tokens: int, batch_size: int = 16, bf16: bool = False):
        self.model, self.renderer = model, renderer
        self.max_new_tokens, self.batch_size, self.bf16 = max_new_tokens, batch_size, bf16
        tok = renderer.tok
        self.stops = sorted({t for t in (renderer.stop_id, tok.eos_token_id) if t is not None})
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.stops[0]

    def predict(self, prompts: Sequence[list[int]]) -> list[tuple[str, None]]:
        import torch

        self.model.eval()
        out: list[tuple[str, None] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        with torch.no_grad(), autocast(self.bf16):
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, text in zip(idx, self._generate([prompts[i] for i in idx])):
                    out[i] = (text, None)
        return out  # type: ignore[return-value]

    def _generate(self, batch: list[list[int]]) -> list[str]:
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=self.stops,
                                  pad_token_id=self.pad)
        gen = self.model.generate(input_ids=ids.to(device()), attention_mask=mask.to(device()), generation_config=config)
        return [self.renderer.tok.decode(row[width:], skip_special_tokens=True).strip() for row in gen.cpu()]
