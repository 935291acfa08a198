"""Pieces every task type shares: the input-text check, few-shot turns, rates over examples."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def check_text(row: dict[str, Any], field: str) -> tuple[str, list[tuple[str, Any]]]:
    """The row's input text (stripped) and the problems with it, as ``(reason, got)`` pairs."""
    if field not in row:
        return "", [(f"missing field {field!r}", f"keys {sorted(row)}")]
    value = row[field]
    if not isinstance(value, str):
        return "", [(f"field {field!r} is not a string", value)]
    if not value.strip():
        return "", [(f"field {field!r} is empty", value)]
    return value.strip(), []


def shot_turns(shots: Sequence[dict[str, Any]], target: Callable[[dict[str, Any]], str]) -> list[dict[str, str]]:
    """Few-shot examples as user/assistant chat turns."""
    turns: list[dict[str, str]] = []
    for shot in shots:
        turns += [{"role": "user", "content": shot["text"]}, {"role": "assistant", "content": target(shot)}]
    return turns


def example_rate(flags: Iterable[bool]) -> float:
    """Share of true flags (0.0 for none)."""
    values = list(flags)
    return sum(values) / len(values) if values else 0.0
