"""Class balancing, one rule for the micro-model's training and the classical baseline's fit: ``train.balance`` resolved
from the train labels, and the per-example weights ∝ count(label)^-``train.balance_power``."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from microtune.core.errors import RecipeError
from microtune.data.dataset import imbalance


def resolve_balance(setting: str, labels: list[str | None]) -> str:
    """``auto`` → ``sample`` when the majority label would dominate (the same rule as `check`'s warning).

    Tasks without labels (extract, generate) have nothing to balance: ``auto`` is ``none`` and an explicit
    ``sample``/``weight`` is an error rather than a silently ignored option."""
    if any(label is None for label in labels):
        if setting in ("sample", "weight"):
            raise RecipeError(f"train.balance={setting} needs labels; this task type has none",
                              hint="set train.balance=auto (or none) for extract and generate recipes")
        return "none"
    if setting != "auto":
        return setting
    return "sample" if imbalance(labels) else "none"


def label_weights(labels: Sequence[str], power: float) -> list[float]:
    """Per-example weight ∝ count(label)^-power, normalised to mean 1."""
    counts = Counter(labels)
    raw = [counts[label] ** -power for label in labels]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def row_weights(rows: Sequence[dict], setting: str, power: float) -> list[float] | None:
    """Each train row's weight under ``train.balance`` = ``setting`` and ``train.balance_power`` = ``power``; ``None``
    where the labels are not balanced (the row's ``label``; rows without one: nothing to balance)."""
    labels = [r.get("label") for r in rows]
    if not rows or resolve_balance(setting, labels) == "none":
        return None
    return label_weights(labels, power)
