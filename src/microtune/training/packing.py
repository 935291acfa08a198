"""Padding-free packing: a batch's examples laid end to end in a few rows, attention kept inside each example.

    batch = pack(examples, pad_id, capacity=256)          # (prompt_ids, completion_ids) pairs
    hidden = packed_hidden_states(decoder, batch)          # the same hidden states as one row per example

Layout. The prompt prefix every example of the batch shares (system prompt, instruction, label list)
is cut off once (``prefix_ids``); each example's remaining tokens (its *suffix*) are placed first-fit
into rows of ``capacity`` tokens. ``seq_ids`` holds each token's example (index + 1; 0 = padding) and
``position_ids`` restart at the prefix length for every example, so each token sees the positions it
would see alone. The attention mask is block-diagonal and causal over the suffixes, plus full access to
the shared prefix (its KV cache is computed once and repeated for the rows): no token ever attends to
another example (tests/training/test_packing.py checks it with a crafted batch). Only the last row can carry
padding, so the linear layers — most of the FLOPs for short examples — see almost no wasted tokens.

The first suffix token of every example is an untrained one (the prefix stops at least one token
before each example's first trained token: the end of its prompt, or of a conversation's first untrained
stretch), so a shifted label at an example boundary is always ignored (-100).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from microtune.models.compat import cache_kwarg, cache_of, mask_for_kernel
from microtune.models.decoding import common_prefix
from microtune.tasks.render import IGNORE, Encoded, labels_of


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity`` tokens, longest first (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([]), room.append(max(capacity, lengths[i]))
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def pack(examples: list[Encoded], pad_id: int, capacity: int, share_prefix: bool = True,
         weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Pack ``(prompt_ids, completion_ids)`` pairs (or conversations with their ``labels``); see the module docstring."""
    import torch

    targets = [labels_of(example) for example in examples]
    p = common_prefix([_untrained_head(e, t) for e, t in zip(examples, targets)]) if share_prefix and len(examples) > 1 else 0
    suffixes = [(example[0] + example[1])[p:] for example in examples]
    rows = first_fit([len(s) for s in suffixes], capacity)
    width = max(sum(len(suffixes[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    ids, labels = torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE, dtype=torch.long)
    positions, seq_ids = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    token_weights = torch.zeros(shape, dtype=torch.float32)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = len(suffixes[i])
            ids[r, col:col + n] = torch.tensor(suffixes[i])
            labels[r, col:col + n] = torch.tensor(targets[i][p:])
            positions[r, col:col + n] = torch.arange(p, p + n)
            seq_ids[r, col:col + n] = i + 1
            token_weights[r, col:col + n] = 1.0 if weights is None else weights[i]
            col += n
    batch = {"prefix_ids": torch.tensor([examples[0][0][:p]], dtype=torch.long), "input_ids": ids, "labels": labels,
             "position_ids": positions, "seq_ids": seq_ids,
             "n_tokens": torch.tensor(sum(len(a) + len(b) for a, b, *_ in examples))}
    if weights is not None:
        batch["token_weights"] = token_weights
    return batch


def _untrained_head(example: Encoded, labels: list[int]) -> list[int]:
    """The ids before the example's first trained token: the most of it a shared prefix may take (a conversation's
    earlier trained turns lie inside its prompt, and the prefix carries no labels)."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    return (example[0] + example[1])[:first]


def block_mask(seq_ids: Any, prefix: int) -> Any:
    """Boolean (rows, 1, L, prefix + L) mask: full access to the prefix, causal within the same example only.

    Padding (seq 0) attends to itself and the prefix, so no query row is empty (an empty row makes NaNs).
    """
    import torch

    rows, width = seq_ids.shape
    causal = torch.ones((width, width), dtype=torch.bool, device=seq_ids.device).tril()
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    suffix = same & causal
    head = torch.ones((rows, width, prefix), dtype=torch.bool, device=seq_ids.device)
    return torch.cat([head, suffix], dim=-1)[:, None]


def packed_hidden_states(decoder: Any, batch: dict[str, Any]) -> Any:
    """Decoder hidden states of the packed rows (rows, L, hidden); the shared prefix runs once."""
    prefix_ids, ids = batch["prefix_ids"], batch["input_ids"]
    p, kwargs = prefix_ids.shape[1], {}
    if p:
        cache = cache_of(decoder(input_ids=prefix_ids, use_cache=True))
        cache.batch_repeat_interleave(ids.shape[0])
        kwargs = {cache_kwarg(decoder): cache, "use_cache": True}
    dtype = decoder.get_input_embeddings().weight.dtype
    mask = mask_for_kernel(block_mask(batch["seq_ids"], p), decoder, dtype)
    return decoder(input_ids=ids, attention_mask=mask, position_ids=batch["position_ids"], **kwargs).last_hidden_state


def is_packed(batch: dict[str, Any]) -> bool:
    return "seq_ids" in batch
