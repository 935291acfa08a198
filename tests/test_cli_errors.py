"""Every command's bad-argument paths: exit code 2, a message that says what is wrong, never a traceback, nothing
written. Cheap cases only (no model is loaded): each fails before any real work."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app

R = "{recipe}"  # a valid recipe (filled in per test)
CASES = [
    # (arguments, a piece of the message)
    (["check"], "Missing argument"),
    (["check", "nowhere.yaml"], "recipe not found"),
    (["check", R, "--set", "train.epochs"], "is not of the form a.b=value"),
    (["check", R, "--set", "train.epochz=1"], "unknown key 'epochz'; did you mean 'epochs'"),
    (["check", R, "--set", "train.lr=-1"], "train.lr"),
    (["check", R, "EXTRA"], "unexpected extra argument"),
    (["check", R, "--bogus"], "No such option: --bogus"),
    (["train", R, "--nproc", "0"], "--nproc"),
    (["train", R, "--set", "method.kind=lorra"], "unknown kind 'lorra'; did you mean 'lora'"),
    (["train", R, "--set", "method.kind=prompt_tuning", "--set", "train.packing=true"], "train.packing cannot be used"),
    (["eval", R, "--adapter", "{missing}"], "is not a microtune adapter artifact"),
    (["report", "{missing}"], "is not a microtune eval artifact"),
    (["export", "{missing}", "--merge", "{out}"], "is not a microtune adapter artifact"),
    (["synth", R], "has no `synth` section"),
    (["watch", R], "--once"),
    (["models", "promote", "toy"], "Missing argument"),
    (["models", "show", "nosuch", "-w", "{ws}"], "no registered model named 'nosuch'"),
    (["models", "promote", "nosuch", "3", "-w", "{ws}"], "no registered model named 'nosuch'"),
    (["models", "rollback", "nosuch", "-w", "{ws}"], "no registered model named 'nosuch'"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--adapter", "no-equals-sign"], "NAME=PATH"),
    (["predict", "{missing}", "-i", R, "-o", "{out}.jsonl"], "is not an adapter folder (no such folder) nor a registered model name"),
    (["predict", "nosuch@champion", "-i", R, "-o", "{out}.jsonl", "-w", "{ws}"], "no registered model named 'nosuch'"),
    (["predict", "nosuch", "-i", R, "-o", "{out}"], "the answers are written as .jsonl, .csv, .parquet"),
    (["predict", "nosuch", "-i", R], "Missing option '--output'"),
    (["predict", "nosuch", "-i", R, "-o", "{out}.jsonl", "--format", "xml"], "--format"),
    (["recipe-schema", "EXTRA"], "unexpected extra argument"),
    (["nosuchcommand"], "No such command"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a)[:50] for a, _ in CASES])
def test_bad_arguments_exit_2_with_the_reason_and_no_traceback(args: list[str], message: str, tmp_path: Path, make_recipe,
                                                               tiny_model_dir: Path) -> None:
    recipe = make_recipe(tiny_model_dir)
    ws = tmp_path / "ws"
    filled = [a.format(recipe=recipe, missing=tmp_path / "missing", out=tmp_path / "out", ws=ws) for a in args]
    result = CliRunner().invoke(app, [*filled, *(["-w", str(ws)] if filled[0] in ("check", "train", "eval", "synth", "watch") else [])])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert not list(ws.rglob("manifest.json")) if ws.exists() else True  # nothing written
    assert not (tmp_path / "out").exists()
