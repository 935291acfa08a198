"""What a run has done so far: the part of training that a checkpoint saves and a resumed run restores."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    """Counters and curves of a run.

    ``micro`` (micro-batches done) is the data position a resumed run continues from; ``elapsed`` the training
    seconds before the current clock (training/loop.py ``Clock``); ``meta`` the caller's run identifiers
    (``mlflow_run_id``, ``recipe_hash``), written beside the counters so a checkpoint names its run.
    """

    step: int = 0
    micro: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    best_loss: float | None = None
    since_best: int = 0
    stopped_early: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready: the counters, then the ``meta`` keys beside them (the layout of a checkpoint's state.json)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"} | self.meta

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The inverse of ``to_dict``: known counters by name, every other key back into ``meta``."""
        names = {f.name for f in fields(cls)} - {"meta"}
        return cls(**{k: v for k, v in data.items() if k in names}, meta={k: v for k, v in data.items() if k not in names})

    def observe_valid(self, loss: float) -> bool:
        """Record a validation loss at the current step; true when it is the best so far."""
        self.valid.append({"step": self.step, "valid_loss": loss})
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.since_best = loss, 0
            return True
        self.since_best += 1
        return False


class Clock:
    """Training seconds: those counted before (a resumed run's, or up to the last checkpoint) plus this stretch.

    Restarted after each checkpoint write, so writing checkpoints does not count as training time."""

    def __init__(self, before: float = 0.0):
        self.before, self.since = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.since
