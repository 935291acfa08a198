"""The CLI's reporter: a bar on a terminal, a line every ~10 % off it, messages printed, metrics left to MLflow."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from microtune.cli import app
from microtune.console import ConsoleReporter, live_bars
from microtune.core.progress import Event


def _console(terminal: bool = False) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120), buffer


def _train_events(total: int) -> list[Event]:
    steps = [Event("train", "progress", s, total, {"loss": 1 / s, "lr": 1e-3, "tokens_per_s": 100.0 * s}) for s in range(1, total + 1)]
    return [Event("train", "start", 0, total), *steps, Event("train", "metrics", total, None, {"valid_loss": 0.5}),
            Event("train", "done", None, total)]


def test_off_the_terminal_a_line_every_tenth_and_at_the_end() -> None:
    console, buffer = _console()
    with ConsoleReporter(console, bars=False) as report:
        for event in _train_events(25):
            report(event)
    lines = buffer.getvalue().splitlines()
    assert lines == [f"step {s}/25  loss {1 / s:.4f}  {100 * s} tok/s" for s in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25)]
    assert "valid_loss" not in buffer.getvalue()  # metrics are for MLflow, not the screen


def test_teacher_answers_and_messages_read_as_before() -> None:
    console, buffer = _console()
    report = ConsoleReporter(console, bars=False)
    report(Event("synth", "start", 0, 3))
    for n in (1, 2, 3):
        report(Event("synth", "progress", n, 3, {"cached": min(n, 2)}))
    report(Event("eval", "message", data={"text": "predicting with micro …", "system": "micro"}))
    report(Event("watch", "message", data={"text": "round 1: retraining [new label]"}))
    assert buffer.getvalue().splitlines() == ["teacher answers 1/3 (1 from cache)", "teacher answers 2/3 (2 from cache)",
                                              "teacher answers 3/3 (2 from cache)", "predicting with micro …",
                                              "watch: round 1: retraining [new label]"]


def test_on_a_terminal_a_bar_that_a_failed_step_does_not_leave_running() -> None:
    console, buffer = _console(terminal=True)
    report = ConsoleReporter(console, bars=True)
    for event in _train_events(20)[:-1]:  # no `done`: the step failed midway
        report(event)
    bar = report._tracks["train"].bar
    assert bar is not None and bar.live.is_started
    report.close()
    assert not bar.live.is_started
    text = buffer.getvalue()
    assert "training" in text and "20/20" in text and "step 2/20" not in text  # a bar, not lines


def test_bars_only_on_an_interactive_terminal_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not live_bars() and not ConsoleReporter(_console()[0]).bars  # a log file or a pipe: lines
    monkeypatch.setattr("sys.stderr", Tty())
    assert live_bars()
    monkeypatch.setenv("CI", "true")
    assert not live_bars()


def test_cli_train_in_a_log_prints_step_lines(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    recipe = make_recipe(tiny_model_dir, train={"max_steps": 10})
    result = CliRunner().invoke(app, ["train", str(recipe), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    steps = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("step ")]
    assert steps == [f"{s}/10" for s in range(1, 11)]
    assert "adapter:" in result.stdout
