"""MLflow runs stay truthful when a later step fails, and an artifact from another store is a clear error."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app

pytestmark = pytest.mark.slow  # each test trains a tiny adapter first


@pytest.fixture
def trained(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> tuple[Path, Path, Path]:
    from microtune import pipeline

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 1}, eval={"max_examples": 4, "baselines": []})
    ws = tmp_path / "ws"
    return recipe, ws, pipeline.train(recipe, workspace=ws)


def _status(ws: Path, adapter: Path) -> str:
    from mlflow import MlflowClient

    from microtune.core.artifacts import read_manifest
    from microtune.core.workspace import Workspace

    run_id = read_manifest(adapter, "adapter")["mlflow_run_id"]
    return MlflowClient(Workspace.at(ws).mlflow_uri).get_run(run_id).info.status


def test_a_failed_eval_leaves_the_training_run_finished(trained) -> None:
    from microtune import pipeline

    recipe, ws, adapter = trained
    assert _status(ws, adapter) == "FINISHED"
    unreachable = "eval.endpoints=[{name: big, base_url: 'http://127.0.0.1:9/v1', model: m, timeout_s: 1}]"
    with pytest.raises(Exception):  # noqa: B017 (whatever the endpoint failure raises, the training run must stay as it was)
        pipeline.evaluate(recipe, [unreachable, "eval.baselines=[]"], ws, adapter=adapter)
    assert _status(ws, adapter) == "FINISHED"
    assert not list((ws / adapter.parent.parent.name / "evals").glob("*/manifest.json"))


def test_an_adapter_of_another_workspace_is_a_clear_error(trained, tmp_path: Path) -> None:
    recipe, ws, adapter = trained
    result = CliRunner().invoke(app, ["eval", str(recipe), "--adapter", str(adapter), "-w", str(tmp_path / "other")])
    assert result.exit_code == 2, result.output
    assert "is not in the tracking store" in result.output and "-w DIR" in result.output
    assert "Traceback" not in result.output
