"""The CLI's reporter: the library's events (``microtune.core.progress``) drawn on the terminal.

    with ConsoleReporter(Console(stderr=True)) as report:
        microtune.train("recipe.yaml", reporter=report)

On a terminal each stage with a total gets a live rich bar; in logs, CI and pipes a plain line every
~10 % of the total (and at the end) instead, so a log stays short and readable. ``message`` events are
printed as they come; ``metrics`` events are for the record (the pipeline sends them to MLflow), not the
screen. This module belongs to the CLI layer: the library itself never prints.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from microtune.core.progress import Event

PREFIX = {"watch": "watch: "}  # message prefixes per stage: a long-running watch log says whose line it is


def live_bars() -> bool:
    """Bars only where a person watches a terminal; logs, CI and pipes get lines."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _train(event: Event) -> tuple[str, str]:
    d = event.data
    return "training", f"loss {d.get('loss', float('nan')):.4f}  {d.get('tokens_per_s', 0.0):.0f} tok/s"


def _synth(event: Event) -> tuple[str, str]:
    return "teacher answers", f"({event.data.get('cached', 0)} from cache)"


def _other(event: Event) -> tuple[str, str]:
    figures = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.data.items())
    return event.stage, figures


def _predict(event: Event) -> tuple[str, str]:
    return "predicting", "rows"


# per stage: what the bar or line is called, and the figures of the moment shown beside the count
LABELS: dict[str, Callable[[Event], tuple[str, str]]] = {"train": _train, "synth": _synth, "predict": _predict}


def line(event: Event) -> str:
    """The log line of a progress event, e.g. ``step 5/50  loss 0.4123  812 tok/s``."""
    name, figures = LABELS.get(event.stage, _other)(event)
    if event.stage == "train":  # the wording `microtune train` logs have always had
        return f"step {event.step}/{event.total}  {figures}"
    return f"{name} {event.step}/{event.total} {figures}".rstrip()


@dataclass
class _Track:
    """One stage's run of work: its total, how often a line is due, and its bar when drawn."""
    total: int | None
    every: int
    bar: Progress | None = None
    task: TaskID | None = None


class ConsoleReporter:
    """A ``Reporter`` for the CLI: bars on a terminal (``bars=None`` decides by `live_bars`), lines otherwise."""

    def __init__(self, console: Console, bars: bool | None = None):
        self.console, self.bars = console, live_bars() if bars is None else bars
        self._tracks: dict[str, _Track] = {}

    def __call__(self, event: Event) -> None:
        if event.kind == "message":
            self._message(event)
        elif event.kind == "start":
            self._start(event)
        elif event.kind == "progress":
            self._progress(event)
        elif event.kind == "done":
            self._stop(event.stage)

    def close(self) -> None:
        """Stop every live bar (a step that failed midway leaves none running)."""
        for stage in list(self._tracks):
            self._stop(stage)

    def __enter__(self) -> ConsoleReporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _message(self, event: Event) -> None:
        text = PREFIX.get(event.stage, "") + str(event.data.get("text", ""))
        self.console.print(escape(text), highlight=False, soft_wrap=True)

    def _start(self, event: Event) -> None:
        self._stop(event.stage)  # a stage that starts again (a second training) gets a fresh bar
        track = _Track(event.total, max(1, (event.total or 0) // 10))
        if self.bars and event.total:
            name, _ = LABELS.get(event.stage, _other)(event)
            track.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[figures]}"), TimeRemainingColumn(), console=self.console)
            track.task = track.bar.add_task(escape(name), total=event.total, completed=event.step or 0, figures="")
            track.bar.start()
        self._tracks[event.stage] = track

    def _progress(self, event: Event) -> None:
        track = self._tracks.get(event.stage)
        if track is None or track.total != event.total:  # progress without a start: begin from here
            self._start(Event(event.stage, "start", event.step, event.total))
            track = self._tracks[event.stage]
        if track.bar is not None and track.task is not None:
            track.bar.update(track.task, completed=event.step, figures=escape(LABELS.get(event.stage, _other)(event)[1]))
        elif event.step is not None and (event.step % track.every == 0 or event.step == event.total):
            self.console.print(escape(line(event)), highlight=False, soft_wrap=True)

    def _stop(self, stage: str) -> None:
        track = self._tracks.pop(stage, None)
        if track is not None and track.bar is not None:
            track.bar.stop()
