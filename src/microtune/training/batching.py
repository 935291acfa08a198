"""Batches for completion-only training: length-bucketed, right-padded, labels -100 on the prompt.

Batches are random by default; with ``window`` > 1 (``train.length_bucketing``) examples are sorted by
length inside windows of that many batches, then the batches shuffled: less padding, but batches of
similar texts, which cost accuracy in short runs (measured; see the recipe field). The order of epoch ``e`` depends only on
``(seed, e)``, so a resumed run sees exactly the batches the interrupted one would have.
With ``weights`` (class balancing), an epoch is ``n`` draws with replacement, ∝ weight.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from microtune.tasks.render import IGNORE, Encoded, labels_of


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                  weights: Sequence[float] | None = None, window: int = 1) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + epoch)
    if weights is None:
        order = list(range(len(lengths)))
        rng.shuffle(order)
    else:
        order = rng.choices(range(len(lengths)), weights=weights, k=len(lengths))
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(n: int, batch_size: int, window: int = 1) -> int:
    span = batch_size * window
    return sum(-(-min(span, n - s) // batch_size) for s in range(0, n, span))


def iterate_batches(lengths: Sequence[int], batch_size: int, seed: int, total: int, start: int = 0,
                    weights: Sequence[float] | None = None, window: int = 1) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(epoch, batch)`` for micro-batches ``start .. total-1`` of the run."""
    per_epoch = batches_per_epoch(len(lengths), batch_size, window)
    done = start
    while done < total:
        epoch, offset = divmod(done, per_epoch)
        for batch in epoch_batches(lengths, batch_size, seed, epoch, weights, window)[offset:]:
            if done == total:
                return
            yield epoch, batch
            done += 1


def collate(examples: list[Encoded], pad_id: int, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """``(prompt_ids, completion_ids)`` pairs → padded tensors; loss only on completion tokens (and on the trained
    earlier turns of a conversation, whose ``labels`` come as a third element: ``tasks.render.labels_of``)."""
    import torch

    width = max(len(p) + len(c) for p, c, *_ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        seq = example[0] + example[1]
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq)] = torch.tensor(labels_of(example))
        mask[row, : len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if weights is not None:
        batch["weights"] = torch.tensor(weights, dtype=torch.float32)
    return batch
