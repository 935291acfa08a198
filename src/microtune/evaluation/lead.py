"""The `lead` baseline for generate: the input's first sentence is the answer.

    model = fit(task, train_rows)               # nothing to learn; the same shape as the classical baseline
    model.predict(test_rows)                    # [(first sentence, None), ...]

Why it is there: in summarisation the lead (the opening of the text) is a classic, strong baseline (news
articles put the gist first; abstracts open with the problem). A micro-model whose ROUGE-L does not beat
copying the first sentence has learnt little. A sentence ends at ``.``, ``!`` or ``?`` followed by white space
(or at a line break); a text without an end of sentence is one sentence. There is no probability (None).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from microtune.tasks import Task

NAME = "lead"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def first_sentence(text: str) -> str:
    """The first non-empty sentence of ``text`` (stripped), or the whole stripped text when it has no sentence end."""
    for part in _SENTENCE_END.split(text.strip()):
        if part.strip():
            return part.strip()
    return ""


class Lead:
    """Answers every row with its first sentence, mapped through the task's ``parse`` like a generated answer."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def predict(self, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, None]]:
        return [(self.task.parse(first_sentence(r["text"])), None) for r in rows]


def fit(task: Task, train: Sequence[dict[str, Any]], weights: Sequence[float] | None = None) -> Lead:
    """Nothing is learnt from ``train`` (nor its ``weights``): taken for the same call shape as ``classical.fit``."""
    return Lead(task)
