"""Batches for completion-only training: length-bucketed, right-padded, labels -100 on the prompt.

Bucketing (sort by length inside windows of many batches, then shuffle the batches) keeps padding
low without giving up randomness across epochs.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

IGNORE = -100


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, window: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """``(prompt_ids, completion_ids)`` pairs → padded tensors; loss only on completion tokens."""
    import torch

    width = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        seq = prompt + completion
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt): len(seq)] = torch.tensor(completion)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iterate_epochs(lengths: list[int], batch_size: int, seed: int, epochs: float) -> Iterator[tuple[int, list[int]]]:
    """Yield ``(epoch, batch)``; a fractional ``epochs`` stops part-way through the last epoch."""
    total = count_batches(lengths, batch_size, epochs)
    done, epoch = 0, 0
    while done < total:
        for batch in bucketed_batches(lengths, batch_size, seed + epoch):
            if done == total:
                return
            yield epoch, batch
            done += 1
        epoch += 1


def count_batches(lengths: list[int], batch_size: int, epochs: float) -> int:
    return max(1, round(len(bucketed_batches(lengths, batch_size, 0)) * epochs))
