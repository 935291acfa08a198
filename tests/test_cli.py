"""The CLI shell: help, exit codes, and messages for the errors a user meets first."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from microtune.cli import app, demo_recipe

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("check", "train", "eval", "run", "demo", "recipe-schema"):
        assert command in result.output


def test_recipe_error_exits_2_with_fix(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\ntask: {instruction: go, lables: [a]}\ndata: {train: t.jsonl}\n")
    result = runner.invoke(app, ["check", str(bad), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2
    assert f"{bad}:2 task.lables: unknown key 'lables'; did you mean 'labels'?" in result.output
    assert "fix:" in result.output


def test_bad_override_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(demo_recipe()), "--set", "train.epochs", "-w", str(tmp_path)])
    assert result.exit_code == 2 and "a.b=value" in result.output


def test_eval_without_adapter_says_to_train_first(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(demo_recipe()), "-w", str(tmp_path)])
    assert result.exit_code == 2
    assert "no adapters artifact for recipe 'banking-intents'" in result.output
    assert "microtune train RECIPE" in result.output


def test_recipe_schema_documents_fields() -> None:
    result = runner.invoke(app, ["recipe-schema"])
    assert result.exit_code == 0 and "Peak learning rate" in result.output


def test_demo_recipe_is_found() -> None:
    assert demo_recipe().name == "banking-intents.yaml"
