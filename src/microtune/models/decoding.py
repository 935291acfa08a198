"""Constrained, batched prediction for classification: every answer is a valid label with a probability.

    predictor = LabelPredictor(model, renderer, labels, batch_size=16, bf16=True)
    preds = predictor.predict(list_of_prompt_ids)      # [(label, probability), ...]
    preds = predictor.predict(prompts, adapter_names=["a", "b", "a"], tries=[trie_a, trie_b, trie_a])

How it is fast: prompts of one system share a long prefix (instruction, label list, few-shot turns);
its KV cache is computed once and copied into every batch, so each example costs only its own
tokens. Decoding walks a token trie of the label completions (label + end-of-turn), one forward pass
for the whole batch per step, and stops as soon as every row's label is decided (the remaining tokens
are forced); logits outside the trie are masked, so no step can leave the label set. The probability
is the product of the per-step probabilities renormalised over the allowed tokens.

Two scorers pick the answer (``scoring``, the recipe's ``task.scoring``):

- ``trie`` (above): greedy — a label whose first token is not the best allowed one is never looked at again, and
  a label that is the only continuation of its first token gets probability 1 for its remaining tokens.
- ``loglik``: every answer is scored by its full-sequence log-likelihood given the prompt (the sum of the
  log-probabilities of all its tokens, end-of-turn included, not renormalised), and the probability is the
  softmax over the answers of those sums: a proper distribution over the label set in which every token of
  every label counts. The prompt (behind the same shared-prefix cache) is computed once per row; each row's label
  continuations are then packed into token trees (as wide as feeds the fewest positions), each on one copy of the row's KV
  (shared label prefixes fed once, a 4D mask; one sequence per answer where the attention kernel takes no such mask),
  chunked so that neither the copied KV nor the logits exceed a budget (150 labels × 16 rows is 2,400 answers).
  ``predict`` continues only the answers that can still matter (their first-token log-probability bounds the whole;
  those left hold under 1 % of the best's mass; ``_loglik``). The default (``DEFAULT_SCORING``).

Mixed-adapter batches (serving many micro-models on one base): ``adapter_names`` gives each row its
PEFT LoRA adapter (PEFT's ``adapter_names`` forward argument) and ``tries`` its own label set, so one
forward pass answers requests for different micro-models. Each adapter's rows share their own prefix
(that micro-model's instruction): the prefixes of all adapters are computed in one left-padded
forward (the KV differs per adapter), and every row continues from its adapter's prefix.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

from microtune.models.compat import cache_kwarg, cache_of, last_logits_only, mask_for_kernel, select_rows, takes_custom_mask
from microtune.models.hardware import autocast, bf16_frozen_weights, device
from microtune.tasks.base import DEFAULT_SCORING, SCORINGS
from microtune.tasks.render import Renderer

END = -1  # trie key marking a finished label
# loglik's chunk budgets: positions of copied KV (rows × (context + label tokens)) and floats of logits (tokens × vocabulary)
# per forward. ~350 MB of KV for a 135M model at 8,192 positions in float32; 2**27 floats are 512 MB.
KV_POSITIONS = 8192
LOGIT_FLOATS = 2**27
# loglik in `predict`: the answers left uncontinued may hold together at most this share of the best answer's mass (their
# bounds summed), so the answer is the unpruned one and its probability is low by less than this relative share.
PRUNE_MASS = 1e-2
# A forward's fixed cost in token positions, for cutting a batch by length (`length_chunks`): a 1×4-token forward of the
# 135M model took 74 ms at one CPU thread where each further position costs ~1.6 ms (~45 positions), and a batch of rows
# makes two or three forwards (the prompt, then the answers' continuations).
CHUNK_FIXED_POSITIONS = 128
# loglik's continuations: a row's KV copied for one more token tree, in fed positions a copied context position costs
# (the copy and the cache's concatenation at every layer, against a position through every layer and the LM head).
KV_COPY_COST = 1 / 64


def length_chunks(lengths: Sequence[int], limit: int, fixed: int = CHUNK_FIXED_POSITIONS) -> list[range]:
    """Cut rows sorted by length (ascending ``lengths``) into consecutive chunks of at most ``limit`` rows, minimising the
    positions fed — each chunk pads its rows to its longest — plus ``fixed`` per chunk (exact: dynamic programming).
    Rows of like length stay in full chunks; a batch mixing short and long prompts (a served batch of two micro-models,
    short chat messages and long reports) is cut where padding the short rows would cost more than another forward."""
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - limit), end):
            cost = best[start] + fixed + (end - start) * lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end > 0:
        chunks.append(range(cut[end], end))
        end = cut[end]
    return chunks[::-1]


def padded(seqs: Sequence[list[int]], pad: int, left: bool) -> tuple[Any, Any]:
    """``(input_ids, attention_mask)`` of token lists padded to the longest: on the left where generation or a shared
    prefix continues from the last column, on the right where each row is read up to its own length."""
    import torch

    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, cols], mask[row, cols] = torch.tensor(s), 1
    return ids, mask


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


def _branches(node: dict[int, Any], head: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The token sequences to feed after ``head`` (the path to ``node``, ``head`` included) so that every decision left
    below ``node`` gets its logits: each ends at a node that still holds a choice and no longer one holds it too.

    A node decided by ``settle`` needs nothing; a node with a choice needs the logits after ``head``, and each child with
    a choice of its own extends the branch by its token. Sharing a branch between the decisions on it keeps the extra
    forward to a handful of short sequences (one per deepest decision, usually one of one or two tokens)."""
    if END in settle(node):
        return []
    deeper = [branch for tok, child in node.items() if tok != END for branch in _branches(child, (*head, tok))]
    return deeper or [head]


def _uses_virtual_tokens(model: Any) -> bool:
    """Prompt/prefix-tuned models get their virtual tokens from PEFT's forward: no external KV cache."""
    # every loaded config, not the active one: a server that unloaded the active adapter leaves a dangling name
    configs = getattr(model, "peft_config", None)
    return isinstance(configs, dict) and any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def _choose(scores: Any, node: dict[int, Any]) -> tuple[int, float]:
    """The best allowed next token of a trie node and its log-probability renormalised over the allowed set."""
    import torch

    allowed = torch.tensor([t for t in node if t != END])
    lp = torch.log_softmax(scores[allowed], dim=-1)
    best = int(lp.argmax())
    return int(allowed[best]), float(lp[best])


def _adapters(names: Sequence[str] | None) -> dict[str, Any]:
    """PEFT's per-row adapter argument; absent for a single-adapter or plain model (it would reject the kwarg)."""
    return {} if names is None else {"adapter_names": list(names)}


def _gather(prefix: tuple[Any, Any] | None, rows: list[int]) -> tuple[Any, Any]:
    """A private copy of the prefix KV and mask for a batch: row i takes prefix row ``rows[i]`` (its group's)."""
    import torch

    if prefix is None:
        return None, torch.zeros((len(rows), 0), dtype=torch.long)
    cache, mask = prefix
    index = torch.tensor(rows)
    one_group = len(set(rows)) == 1  # every row reads the same prefix: views of it
    return select_rows(cache, index.to(device()), expand=len(rows) if one_group else 0), mask[index]


class LabelPredictor:
    def __init__(self, model: Any, renderer: Renderer, labels: Sequence[str], batch_size: int = 16, bf16: bool = False,
                 share_prefix: bool = True, scoring: str = DEFAULT_SCORING, kv_positions: int = KV_POSITIONS,
                 logit_floats: int = LOGIT_FLOATS, prune_mass: float = PRUNE_MASS, tree: bool = True):
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {list(SCORINGS)}, got {scoring!r}")
        self.model, self.renderer, self.scoring = model, renderer, scoring
        self.kv_positions, self.logit_floats, self.prune_mass = kv_positions, logit_floats, prune_mass
        self.continued = 0  # loglik: (row, answer) continuations scored so far (what pruning saves shows here)
        self.second_rounds = 0  # loglik's pruned predict: batches that needed a second round of continuations
        self.tree_rounds = 0  # loglik: rounds of continuations read as token trees (the rest: one sequence per answer)
        self.cached = not _uses_virtual_tokens(model)
        self.share_prefix = share_prefix and self.cached
        self.cache_kw = cache_kwarg(model)
        self.head_kw = last_logits_only(model)
        self.tree = tree and takes_custom_mask(model)  # loglik's continuations of a row as one token tree (_continue_tree)
        self.trie = build_trie({label: renderer.completion_ids(label) for label in labels})
        self.batch_size, self.bf16 = batch_size, bf16
        self.pad = renderer.tok.pad_token_id

    def predict(self, prompts: Sequence[list[int]], adapter_names: Sequence[str] | None = None,
                tries: Sequence[dict[int, Any]] | None = None) -> list[tuple[str, float]]:
        """One ``(label, probability)`` per prompt; optionally one PEFT adapter and one label trie per row."""
        if self.scoring == "loglik":
            pruned = functools.partial(self._loglik, prune=True)  # only the best answer and its probability are wanted
            ranked = self._batched(prompts, adapter_names, tries, pruned, self._loglik_uncached)
            return [(answers[0][0], math.exp(answers[0][1])) for answers in ranked]
        return self._batched(prompts, adapter_names, tries, self._decode, self._decode_uncached)

    def rank(self, prompts: Sequence[list[int]], adapter_names: Sequence[str] | None = None,
             tries: Sequence[dict[int, Any]] | None = None) -> list[list[tuple[str, float]]]:
        """Per prompt, every answer of its trie with its ``loglik`` log-probability, most probable first.

        An answer's log-probability is its full-sequence log-likelihood minus the log-sum-exp over all the row's
        answers (a log-softmax over the label set), so the entries of a row sum to 1 once exponentiated and the first
        is the answer ``predict`` gives with ``scoring="loglik"``."""
        return self._batched(prompts, adapter_names, tries, self._loglik, self._loglik_uncached)

    def _batched(self, prompts: Sequence[list[int]], adapter_names: Sequence[str] | None, tries: Sequence[dict[int, Any]] | None,
                 cached: Any, uncached: Any) -> list[Any]:
        """Run a scorer over batches of rows behind the shared prefix cache: ``cached(suffixes, prefix_mask, cache, tries,
        names)`` continues from each row's group prefix; ``uncached(prompts, tries, names)`` (prompt/prefix-tuned models)
        reads the whole prompts."""
        import torch

        self.model.eval()
        row_tries = list(tries) if tries is not None else [self.trie] * len(prompts)
        groups = list(adapter_names) if adapter_names is not None else [""] * len(prompts)
        distinct = sorted(set(groups))
        plen = {g: common_prefix([p for p, h in zip(prompts, groups) if h == g]) if self.share_prefix else 0 for g in distinct}
        own = [len(p) - plen[g] for p, g in zip(prompts, groups)]  # each row's tokens after its group's prefix
        out: list[Any] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: own[i])
        with torch.no_grad(), autocast(self.bf16), bf16_frozen_weights(self.model, self.bf16):
            prefix = self._prefixes(prompts, groups, distinct, plen, adapter_names is not None) if any(plen.values()) else None
            for chunk in length_chunks([own[i] for i in order], self.batch_size):
                idx = [order[k] for k in chunk]
                names = [adapter_names[i] for i in idx] if adapter_names is not None else None
                rows = [row_tries[i] for i in idx]
                if self.cached:
                    cache, prefix_mask = _gather(prefix, [distinct.index(groups[i]) for i in idx])
                    preds = cached([prompts[i][plen[groups[i]]:] for i in idx], prefix_mask, cache, rows, names)
                else:
                    preds = uncached([list(prompts[i]) for i in idx], rows, names)
                for i, pred in zip(idx, preds):
                    out[i] = pred
        return out

    def _prefixes(self, prompts: Sequence[list[int]], groups: list[str], distinct: list[str], plen: dict[str, int],
                  mixed: bool) -> tuple[Any, Any]:
        """KV of each group's shared prefix in one forward, left-padded to the longest: ``(cache, mask)``, one row per group.

        A group is an adapter in a mixed batch (its prompts share its instruction, and LoRA changes the keys and
        values), or all prompts otherwise."""

        ids, mask = padded([next(p for p, h in zip(prompts, groups) if h == g)[: plen[g]] for g in distinct], self.pad, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = device()
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True,
                         **_adapters(distinct if mixed else None), **self.head_kw)
        return cache_of(out), mask

    def _decode(self, suffixes: list[list[int]], prefix_mask: Any, cache: Any, tries: list[dict[int, Any]],
                names: list[str] | None = None) -> list[tuple[str, float]]:
        """The greedy trie walk behind the prefix cache in at most two forwards per batch.

        The prompt forward's last-position logits (the LM head on that position only) pick every row's first label
        token; most labels are decided there (``settle``) and cost nothing more. The rows still undecided feed, in one
        more forward, every branch of the trie below their first token that holds a decision (``_branches``), each on its
        row's KV: the logits at each position of those short sequences are the logits the next step-by-step forward
        would give, so the walk finishes from them with the same choices — one forward over a few tokens instead of a
        forward of the whole batch per remaining step."""
        import torch

        p = prefix_mask.shape[1]
        ids, suffix_mask = padded(suffixes, self.pad, left=True)  # left-padded: every row ends at the same column
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = device()
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos[:, p:].to(dev),
                         use_cache=True, **{self.cache_kw: cache}, **_adapters(names), **self.head_kw)
        scores = out.logits[:, -1, :].float()
        firsts, logprob = [], []
        for row, trie in enumerate(tries):
            tok, lp = _choose(scores[row], trie)
            firsts.append(tok)
            logprob.append(lp)
        nodes = [settle(trie[tok]) for trie, tok in zip(tries, firsts)]
        open_rows = [row for row, node in enumerate(nodes) if END not in node]
        if open_rows:
            self._finish(open_rows, firsts, tries, nodes, logprob, (cache_of(out), mask, pos[:, -1] + 1), names)
        return [(n[END], float(torch.tensor(lp).exp())) for n, lp in zip(nodes, logprob)]

    def _finish(self, open_rows: list[int], firsts: list[int], tries: list[dict[int, Any]], nodes: list[dict[int, Any]],
                logprob: list[float], state: tuple[Any, Any, Any], names: list[str] | None) -> None:
        """Walk the undecided rows down their trie from the logits of one forward over their branches (``nodes`` and
        ``logprob`` are updated in place). ``state`` is the batch's KV after the prompt, its mask and each row's next
        position; the KV rows are taken for the branches (a branch's row repeated once per branch)."""
        import torch

        seqs, rows = [], []
        for row in open_rows:
            for branch in _branches(tries[row][firsts[row]], (firsts[row],)):
                seqs.append(list(branch))
                rows.append(row)
        cache, mask, next_pos = state
        index = torch.tensor(rows)
        cache.batch_select_indices(index.to(device()))
        ids, seq_mask = padded(seqs, self.pad, left=False)  # right-padded: position j of every branch is its token j
        seq_pos = next_pos[index][:, None] + torch.arange(ids.shape[1])[None, :]
        dev = device()
        logits = self.model(input_ids=ids.to(dev), attention_mask=torch.cat([mask[index], seq_mask], dim=1).to(dev),
                            position_ids=seq_pos.to(dev), use_cache=True, **{self.cache_kw: cache},
                            **_adapters(None if names is None else [names[r] for r in rows])).logits.float()
        for row in open_rows:
            mine = [(k, seqs[k]) for k, r in enumerate(rows) if r == row]
            walked = [firsts[row]]
            node = tries[row][firsts[row]]
            while END not in settle(node):
                k = next(k for k, seq in mine if seq[:len(walked)] == walked)  # a branch through the walked tokens
                tok, lp = _choose(logits[k, len(walked) - 1], node)
                logprob[row] += lp
                walked.append(tok)
                node = node[tok]
            nodes[row] = settle(node)

    def _decode_uncached(self, seqs: list[list[int]], tries: list[dict[int, Any]],
                         names: list[str] | None = None) -> list[tuple[str, float]]:
        """Trie decoding by full forwards (right-padded, no KV cache): for prompt/prefix-tuned adapters."""
        import torch

        nodes, logprob, dev = list(tries), [0.0] * len(seqs), device()
        while not all(END in n for n in nodes):
            ids, mask = padded(seqs, self.pad, left=False)
            width = ids.shape[1]
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **_adapters(names)).logits.float()
            offset = logits.shape[1] - width  # prompt tuning prepends its virtual tokens to the output
            for row, s in enumerate(seqs):
                if END not in nodes[row]:
                    tok, lp = _choose(logits[row, offset + len(s) - 1], nodes[row])
                    logprob[row] += lp
                    nodes[row] = settle(nodes[row][tok])
                    s.append(tok)
        return [(n[END], float(torch.tensor(lp).exp())) for n, lp in zip(nodes, logprob)]

    def _loglik(self, suffixes: list[list[int]], prefix_mask: Any, cache: Any, tries: list[dict[int, Any]],
                names: list[str] | None = None, prune: bool = False) -> list[list[tuple[str, float]]]:
        """``loglik`` behind the prefix cache: one forward over the rows' own tokens gives each row's KV and the
        log-probabilities of every answer's first token; then every (row, answer) continuation — the answer's tokens but
        its last — is read in chunks on a copy of its row's KV (packed token trees, `_continue_tree`), each position scoring
        the next token.

        ``prune`` (what ``predict`` asks for: the best answer and its probability): an answer's first-token
        log-probability bounds its whole log-likelihood from above (every further token adds a log-probability ≤ 0).
        So a first round continues, per row, the answers of highest bound until the bounds of the rest sum to at most
        ``prune_mass`` (default 1 %) of the row's best first-token probability; a second round (the batch's forwards
        count it, ``second_rounds``) continues more until they sum to at most that share of the best full likelihood
        found, which the first round's lead can fall short of by what its later tokens cost. The rest keep their bound:
        each is below the best, so the answer is exactly the unpruned one, and their bounds overstate the row's total by
        less than ``prune_mass`` of the best, so its probability is low by less than that share (relative), whatever
        the number of labels."""
        import torch

        p = prefix_mask.shape[1]
        ids, suffix_mask = padded(suffixes, self.pad, left=True)  # left-padded: every row ends at the same column
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev, extra = device(), _adapters(names)
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos[:, p:].to(dev),
                         use_cache=True, **{self.cache_kw: cache}, **extra, **self.head_kw)
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
        rows_cache, next_pos = cache_of(out), pos[:, -1] + 1
        pairs = _pairs(tries)
        totals = [float(first[row, tokens[0]]) for row, _, tokens in pairs]  # a one-token answer's is final; else a bound

        def continue_(todo: list[int]) -> None:
            if self.tree:
                self._continue_tree(_packed(todo, pairs, mask.shape[1]), pairs, totals, (rows_cache, mask, next_pos), names)
                return
            for sub in self._chunks([len(pairs[k][2]) - 1 for k in todo], mask.shape[1]):
                chunk = [todo[j] for j in sub]
                rows = [pairs[k][0] for k in chunk]
                cont_ids, cont_mask = padded([pairs[k][2][:-1] for k in chunk], self.pad, left=False)
                kv, kv_mask = _gather((rows_cache, mask), rows)
                cont_pos = next_pos[rows][:, None] + torch.arange(cont_ids.shape[1])[None, :]
                logits = self.model(input_ids=cont_ids.to(dev), attention_mask=torch.cat([kv_mask, cont_mask], dim=1).to(dev),
                                    position_ids=cont_pos.to(dev), use_cache=True, **{self.cache_kw: kv},
                                    **_adapters(None if names is None else [names[r] for r in rows])).logits
                for k, value in zip(chunk, _sequence_logprobs(logits, [0] * len(chunk), [pairs[k][2][1:] for k in chunk])):
                    totals[k] += value
                self.continued += len(chunk)

        longer = [k for k, (_, _, tokens) in enumerate(pairs) if len(tokens) > 1]
        if not prune:
            continue_(longer)
            return _ranked(pairs, totals, len(tries))
        by_row: dict[int, list[int]] = {}  # each row's longer answers, highest bound first
        for k in sorted(longer, key=lambda k: -totals[k]):
            by_row.setdefault(pairs[k][0], []).append(k)
        lead: dict[int, float] = {}  # row → its best first-token log-probability: every answer's bound is at most this
        for k, (row, _, _) in enumerate(pairs):
            lead[row] = max(lead.get(row, -math.inf), totals[k])
        first_round = [k for row, ks in by_row.items() for k in _needed(ks, totals, lead[row], self.prune_mass)]
        continue_(first_round)
        done = set(first_round)
        best: dict[int, float] = {}  # per row, the best full log-likelihood found: the bar the pruned answers' mass is held to
        for k, (row, _, tokens) in enumerate(pairs):
            if len(tokens) == 1 or k in done:
                best[row] = max(best.get(row, -math.inf), totals[k])
        second = [k for row, ks in by_row.items()
                  for k in _needed([k for k in ks if k not in done], totals, best[row], self.prune_mass)]
        if second:
            self.second_rounds += 1
            continue_(second)
        return _ranked(pairs, totals, len(tries))

    def _continue_tree(self, units: list[tuple[int, list[int]]], pairs: list[tuple[int, str, list[int]]],
                       totals: list[float], state: tuple[Any, Any, Any], names: list[str] | None) -> None:
        """Add to ``totals[k]`` the log-probabilities of the later tokens of answer ``k`` for every ``k`` of every unit
        ``(row, answers)``: a unit's answers (their tokens but the last) as one token tree — a prefix shared by answers
        is fed once — behind one copy of the row's KV, with a 4D mask letting each node see the prompt, its ancestors
        and itself, and its position its depth. Node logits predict the next token of every answer through that node,
        so the sums are those of one sequence per answer (``tree=False``) in fewer positions (`_packed` chooses the units). ``state``: the batch's KV
        after the prompt, its mask and each row's next position."""
        import torch

        rows_cache, mask, next_pos = state
        trees = [_tree([pairs[k][2][:-1] for k in ks]) for _, ks in units]
        order = sorted(range(len(units)), key=lambda u: len(trees[u][0]))  # chunks of like-sized trees: less padding
        dev, dtype = device(), self.model.get_input_embeddings().weight.dtype
        self.tree_rounds += 1
        for sub in self._chunks([len(trees[u][0]) for u in order], mask.shape[1]):
            chunk = [order[j] for j in sub]
            width = max(len(trees[u][0]) for u in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            depth = torch.zeros((len(chunk), width), dtype=torch.long)
            sees = torch.eye(width, dtype=torch.bool).repeat(len(chunk), 1, 1)  # padding sees itself: no empty row
            for i, u in enumerate(chunk):
                tokens, parents, _ = trees[u]
                ids[i, :len(tokens)] = torch.tensor(tokens)
                for node, parent in enumerate(parents):
                    if parent >= 0:  # a parent precedes its children: its row is final
                        sees[i, node] |= sees[i, parent]
                        depth[i, node] = depth[i, parent] + 1
            rows = [units[u][0] for u in chunk]
            kv, kv_mask = _gather((rows_cache, mask), rows)
            full = torch.cat([kv_mask.bool()[:, None, :].expand(-1, width, -1), sees], dim=-1)[:, None]
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask_for_kernel(full.to(dev), self.model, dtype),
                                position_ids=(next_pos[rows][:, None] + depth).to(dev), use_cache=True,
                                **{self.cache_kw: kv}, **_adapters(None if names is None else [names[r] for r in rows])).logits
            where, nodes, targets, owner = [], [], [], []
            for i, u in enumerate(chunk):
                for k, path in zip(units[u][1], trees[u][2]):
                    for j, node in enumerate(path):
                        where.append(i)
                        nodes.append(node)
                        targets.append(pairs[k][2][j + 1])
                        owner.append(k)
            read = logits[torch.tensor(where, device=logits.device), torch.tensor(nodes, device=logits.device)]
            for k, lp in zip(owner, _logprobs(read, torch.tensor(targets, device=logits.device)).tolist()):
                totals[k] += lp
        self.continued += sum(len(ks) for _, ks in units)

    def _loglik_uncached(self, seqs: list[list[int]], tries: list[dict[int, Any]],
                         names: list[str] | None = None) -> list[list[tuple[str, float]]]:
        """``loglik`` by full forwards (right-padded, no KV cache): for prompt/prefix-tuned adapters. Each (row, answer)
        sequence is the prompt and the answer's tokens but its last, read in chunks."""
        pairs, dev = _pairs(tries), device()
        totals = [0.0] * len(pairs)
        longest = max((len(s) for s in seqs), default=0)
        for chunk in self._chunks([longest + len(tokens) - 1 for _, _, tokens in pairs], 0):
            ids, mask = padded([seqs[pairs[k][0]] + pairs[k][2][:-1] for k in chunk], self.pad, left=False)
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                **_adapters(None if names is None else [names[pairs[k][0]] for k in chunk])).logits
            offset = logits.shape[1] - ids.shape[1]  # prompt tuning prepends its virtual tokens to the output
            starts = [offset + len(seqs[pairs[k][0]]) - 1 for k in chunk]
            for k, value in zip(chunk, _sequence_logprobs(logits, starts, [pairs[k][2] for k in chunk])):
                totals[k] = value
        return _ranked(pairs, totals, len(tries))

    def _chunks(self, lengths: list[int], context: int) -> list[list[int]]:
        """Consecutive indices of ``lengths`` (tokens each sequence feeds) in chunks that keep one forward under the budgets:
        ``kv_positions`` for the KV (``context`` copied positions + the fed tokens, per sequence) and ``logit_floats`` for
        its logits (every fed position × the vocabulary). Uncached sequences feed their whole prompt: ``context`` is 0."""
        vocab = max(int(getattr(getattr(self.model, "config", None), "vocab_size", 0) or 0), len(self.renderer.tok))
        out: list[list[int]] = []
        chunk: list[int] = []
        width = 0
        for k, n in enumerate(lengths):
            if n <= 0:  # a one-token answer has nothing to continue: its first token's log-probability is all of it
                continue
            wide = max(width, n)
            if chunk and ((len(chunk) + 1) * (context + wide) > self.kv_positions or (len(chunk) + 1) * wide * vocab > self.logit_floats):
                out.append(chunk)
                chunk, wide = [], n
            chunk.append(k)
            width = wide
        return out + ([chunk] if chunk else [])

    def answer_logprobs(self, prompt: list[int], trie: dict[int, Any] | None = None,
                        adapter_name: str | None = None) -> list[tuple[str, float]]:
        """Every answer of the trie with its log-probability for one prompt, most probable first.

        The probability of an answer is the one ``predict`` reports for the answer it picks: the product over
        the answer's tokens of the next-token probability renormalised over the tokens the trie allows there (a
        forced token counts 1). So the picked answer's entry equals its reported probability and all entries sum
        to 1 — a distribution over the valid answers, unlike the top-k tokens at one decision step, which mixes
        answers that share a first token. Scored by teacher forcing (prompt + each answer's tokens, right-padded,
        no cache, so prompt-learning models work too): one forward per ``batch_size`` answers, asked for only when
        a request wants ``top_logprobs``. With ``scoring="loglik"`` they are the entries of ``rank``: the softmax over the
        answers of their full-sequence log-likelihoods."""
        import torch

        if self.scoring == "loglik":
            return self.rank([prompt], None if adapter_name is None else [adapter_name], [trie if trie is not None else self.trie])[0]
        paths = _paths(trie if trie is not None else self.trie)
        out: list[tuple[str, float]] = []
        self.model.eval()
        with torch.no_grad(), autocast(self.bf16), bf16_frozen_weights(self.model, self.bf16):
            for start in range(0, len(paths), self.batch_size):
                chunk = paths[start:start + self.batch_size]
                ids, mask = padded([prompt + tokens[:-1] for _, tokens in chunk], self.pad, left=False)
                names = None if adapter_name is None else [adapter_name] * len(chunk)
                logits = self.model(input_ids=ids.to(device()), attention_mask=mask.to(device()), **_adapters(names)).logits.float()
                offset = logits.shape[1] - ids.shape[1]  # prompt tuning prepends its virtual tokens to the output
                for row, (answer, tokens) in enumerate(chunk):
                    out.append((answer, _path_logprob(logits[row], offset + len(prompt) - 1, tokens, trie or self.trie)))
        return sorted(out, key=lambda item: -item[1])


def _paths(trie: dict[int, Any], head: tuple[int, ...] = ()) -> list[tuple[str, list[int]]]:
    """``(answer, its tokens)`` of every answer in a trie."""
    out: list[tuple[str, list[int]]] = []
    for tok, child in trie.items():
        if tok == END:
            out.append((child, list(head)))
        else:
            out.extend(_paths(child, (*head, tok)))
    return out


def _path_logprob(logits: Any, first: int, tokens: list[int], trie: dict[int, Any]) -> float:
    """Sum of the renormalised log-probabilities of ``tokens`` along the trie; ``logits[first + j]`` predicts token j."""
    import torch

    node, total = trie, 0.0
    for j, tok in enumerate(tokens):
        allowed = [t for t in node if t != END]
        if len(allowed) > 1:
            lp = torch.log_softmax(logits[first + j][torch.tensor(allowed)], dim=-1)
            total += float(lp[allowed.index(tok)])
        node = node[tok]
    return total



def _tree(sequences: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """The distinct prefixes of token sequences as tree nodes, parents first: each node's token and parent (-1: a root),
    and per sequence the node of each of its tokens."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    paths: list[list[int]] = []
    for seq in sequences:
        path: list[int] = []
        for j in range(len(seq)):
            key = tuple(seq[: j + 1])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(seq[j])
                parents.append(path[-1] if path else -1)
            path.append(index[key])
        paths.append(path)
    return tokens, parents, paths


def _packed(todo: list[int], pairs: list[tuple[int, str, list[int]]], context: int = 0,
            copy_cost: float = KV_COPY_COST) -> list[tuple[int, list[int]]]:
    """The answers ``todo`` as units ``(row, answers)`` for `LabelPredictor._continue_tree`, each unit one token tree
    on its own copy of the row's KV (``context`` positions). A row's answers go, longest first, into the first of its
    units whose tree (shared prefixes counted once) stays within a width; the width is the one, from the longest
    continuation up to the widest row's whole tree, that feeds the fewest positions counting each unit's KV copy at
    ``copy_cost`` a position: narrow units pad no short answer and no row continuing few answers to the longest or the
    busiest (a trained micro-model, a few answers a row), one tree a row shares every prefix once and copies the KV
    once (a base model prompted with the label list, every answer a row; benchmarks/predict_levers.py --scoring loglik)."""
    if not todo:
        return []
    by_row: dict[int, list[int]] = {}
    for k in sorted(todo, key=lambda k: -len(pairs[k][2])):
        by_row.setdefault(pairs[k][0], []).append(k)
    longest = max(len(pairs[k][2]) - 1 for k in todo)
    widest = max(len(_tree([pairs[k][2][:-1] for k in ks])[0]) for ks in by_row.values())
    widths = sorted({min(longest * 2 ** i, widest) for i in range(max(widest // max(longest, 1), 1).bit_length() + 1)})

    def fill(width: int) -> list[tuple[int, list[int]]]:
        units: list[tuple[int, list[int], set[tuple[int, ...]]]] = []
        for row, ks in by_row.items():
            mine: list[int] = []  # this row's units, by index into ``units``
            for k in ks:
                tokens = pairs[k][2][:-1]
                prefixes = {tuple(tokens[: j + 1]) for j in range(len(tokens))}
                for u in mine:
                    if len(units[u][2] | prefixes) <= width:
                        units[u][1].append(k)
                        units[u][2].update(prefixes)
                        break
                else:
                    mine.append(len(units))
                    units.append((row, [k], prefixes))
        return [(row, ks) for row, ks, _ in units]

    return min((fill(w) for w in widths), key=lambda units: len(units) * (max(
        len(_tree([pairs[k][2][:-1] for k in ks])[0]) for _, ks in units) + context * copy_cost))


def _pairs(tries: Sequence[dict[int, Any]]) -> list[tuple[int, str, list[int]]]:
    """``(row, answer, its tokens)`` for every answer of every row's trie (the paths of a trie shared by rows listed once)."""
    paths: dict[int, list[tuple[str, list[int]]]] = {}
    out: list[tuple[int, str, list[int]]] = []
    for row, trie in enumerate(tries):
        if id(trie) not in paths:
            paths[id(trie)] = _paths(trie)
        out.extend((row, answer, tokens) for answer, tokens in paths[id(trie)])
    return out


def _logprobs(logits: Any, targets: Any, rows: int = 256) -> Any:
    """``log_softmax(logits)[i, targets[i]]`` for every row ``i`` of ``[n, vocabulary]`` logits, normalised in float32 a
    few rows at a time: no float32 copy of every position's logits (a cached block instead of a pass through memory)."""
    import torch

    chosen = logits.gather(-1, targets[:, None]).squeeze(-1).float()
    norm = torch.cat([torch.logsumexp(logits[i:i + rows].float(), dim=-1) for i in range(0, logits.shape[0], rows)]) \
        if logits.shape[0] else chosen
    return chosen - norm


def _sequence_logprobs(logits: Any, starts: list[int], tokens: list[list[int]]) -> list[float]:
    """Per sequence j of a batch, the sum of the plain (not renormalised) log-probabilities of ``tokens[j]``, where
    ``logits[j, starts[j] + i]`` predicts ``tokens[j][i]``: one gather and one log-sum-exp over the positions read."""
    import torch

    width = max((len(t) for t in tokens), default=0)
    if width == 0:
        return [0.0] * len(tokens)
    dev = logits.device
    valid = torch.tensor([[i < len(t) for i in range(width)] for t in tokens], device=dev)
    target = torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=dev)
    pos = (torch.tensor(starts, device=dev)[:, None] + torch.arange(width, device=dev)[None, :]).clamp(max=logits.shape[1] - 1)
    rows = logits[torch.arange(len(tokens), device=dev)[:, None], pos].float()  # [sequences, width, vocab]
    chosen = rows.gather(-1, target[..., None]).squeeze(-1)
    return ((chosen - torch.logsumexp(rows, dim=-1)) * valid).sum(-1).tolist()


def _needed(ranked: list[int], totals: list[float], bar: float, share: float) -> list[int]:
    """The fewest of ``ranked`` (answers by upper bound ``totals[k]``, highest first) to continue so that the bounds of
    the rest sum to at most ``share`` of ``exp(bar)``: a head of the list."""
    rest = -math.inf  # log of the summed bounds of ranked[j:], built from the tail
    tails = [rest] * (len(ranked) + 1)
    for j in range(len(ranked) - 1, -1, -1):
        top, low = max(rest, totals[ranked[j]]), min(rest, totals[ranked[j]])
        rest = top + math.log1p(math.exp(low - top)) if top > -math.inf else top
        tails[j] = rest
    limit = bar + math.log(share)
    return ranked[: next(j for j in range(len(ranked) + 1) if tails[j] <= limit)]


def _ranked(pairs: list[tuple[int, str, list[int]]], totals: list[float], n_rows: int) -> list[list[tuple[str, float]]]:
    """Per row, ``(answer, log-softmax over the row's answers of the totals)``, most probable first (ties keep trie order)."""
    per_row: list[list[tuple[str, float]]] = [[] for _ in range(n_rows)]
    for (row, answer, _), total in zip(pairs, totals):
        per_row[row].append((answer, total))
    out = []
    for answers in per_row:
        top = max(t for _, t in answers)
        norm = top + math.log(sum(math.exp(t - top) for _, t in answers))
        out.append(sorted(((a, t - norm) for a, t in answers), key=lambda item: -item[1]))
    return out
