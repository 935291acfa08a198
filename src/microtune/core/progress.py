"""Progress and events: the one shape in which the library tells its caller what is happening.

    def show(event: Event) -> None:
        print(event.stage, event.kind, event.step, event.total, event.data)

    microtune.train("recipe.yaml", reporter=show)

Every long-running function takes ``reporter: Reporter | None`` and calls it with an ``Event``; the
library itself never prints. The CLI turns events into a progress bar (on a terminal) or a line every
~10 % (in logs); the pipeline also forwards ``metrics`` events to MLflow. Kinds:

- ``start``    — work of ``total`` steps begins (``data`` may describe it)
- ``progress`` — ``step`` of ``total`` done (``data``: figures of the moment, e.g. loss, tokens/s)
- ``metrics``  — figures to record at ``step`` (``data``: name → number), e.g. train and valid loss
- ``message``  — something a person may want to read (``data["text"]``), e.g. a system evaluated
- ``done``     — the work ended (``data`` may summarise it)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Kind = Literal["start", "progress", "metrics", "message", "done"]


@dataclass(frozen=True)
class Event:
    stage: str
    kind: Kind
    step: int | None = None
    total: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


class Reporter(Protocol):
    def __call__(self, event: Event) -> None: ...


def silent(event: Event) -> None:
    """A reporter that drops every event."""


def tee(*reporters: Reporter | None) -> Reporter:
    """One reporter that hands each event to every given one (``None`` entries are skipped)."""
    live = [r for r in reporters if r is not None]

    def each(event: Event) -> None:
        for reporter in live:
            reporter(event)

    return each


def only(kinds: Iterable[str], reporter: Reporter) -> Reporter:
    """Forward just the events of the given kinds."""
    keep = set(kinds)
    return lambda event: reporter(event) if event.kind in keep else None


def emitter(reporter: Reporter | None, stage: str) -> Callable[..., None]:
    """``emit(kind, step=None, total=None, **data)`` for one stage; a no-op without a reporter."""
    target = reporter or silent

    def emit(kind: Kind, step: int | None = None, total: int | None = None, **data: Any) -> None:
        target(Event(stage, kind, step, total, data))

    return emit
