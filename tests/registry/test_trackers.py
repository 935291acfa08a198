"""Trackers beside MLflow (`tracking.backends`): W&B (offline, read back from its run file) and TensorBoard (its event
files read back) get the same parameters and metrics as MLflow; a missing package is a clear error at check; a mirror
that raises is a warning and the MLflow run still FINISHES."""
from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.config import load_recipe
from microtune.core.errors import RecipeError
from microtune.core.workspace import Workspace
from microtune.registry import trackers
from microtune.registry.trackers import Backend, tracked_run


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never the network, never the home folder: W&B offline, its settings, cache and data under tmp."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """One workspace (one MLflow store: creating one is the slow part) for the fast tests of the fan-out."""
    return Workspace.at(tmp_path_factory.mktemp("ws"))


def _client(ws: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(Workspace.at(ws).mlflow_uri)


# -- reading the mirrors back ------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[Any]:
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log chunks (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each record a protobuf
    ``Record``. wandb 0.31 no longer ships a Python reader (its Go core writes the file), hence these few lines."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wandb_run(ws: Path, run_id: str) -> tuple[dict[str, Any], dict[str, float], list[int]]:
    """(config, final summary, exit codes) over every offline folder of one W&B run id, in the order they were written."""
    config: dict[str, Any] = {}
    summary: dict[str, float] = {}
    exits: list[int] = []
    folders = sorted((ws / "wandb").glob(f"offline-run-*-{run_id}"))
    assert folders, f"no offline W&B run {run_id} in {ws / 'wandb'}"
    for folder in folders:
        for record in _wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config |= {u.key: json.loads(u.value_json) for u in record.run.config.update if not u.key.startswith("_")}
            elif kind == "config":
                config |= {u.key: json.loads(u.value_json) for u in record.config.update if not u.key.startswith("_")}
            elif kind == "summary":
                summary |= {u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update}
            elif kind == "exit":
                exits.append(record.exit.exit_code)
    return config, {k: v for k, v in summary.items() if not k.startswith("_")}, exits


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard run folder (all its event files): tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def _tensorboard_params(folder: Path) -> dict[str, Any]:
    """The parameters of a TensorBoard run folder, as its HParams session start holds them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(folder))
    acc.Reload()
    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def _mlflow_series(client: Any, run: Any) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


# -- the end-to-end proof ----------------------------------------------------------------------------------------


@pytest.mark.slow  # trains a tiny adapter (3 steps) and evaluates it on 4 rows
def test_wandb_and_tensorboard_mirror_what_mlflow_records(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline
    from microtune.core.artifacts import read_manifest

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 3, "eval_steps": 2}, eval={"max_examples": 4, "baselines": []},
                         tracking={"backends": ["mlflow", "wandb", "tensorboard"]})
    ws = tmp_path / "ws"
    adapter = pipeline.train(recipe, ["data.split.valid=0.3"], workspace=ws)
    pipeline.evaluate(recipe, workspace=ws, adapter=adapter)
    run_id = read_manifest(adapter, "adapter")["mlflow_run_id"]
    client = _client(ws)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert not any(k.startswith(trackers.TAG) for k in run.data.tags), run.data.tags
    series = _mlflow_series(client, run)
    assert {"loss", "lr", "tokens_per_s", "valid_loss"} <= set(series) and any(k.startswith("eval.") for k in series)
    assert any(k.startswith("cost.") for k in series)
    assert len(series["loss"]) == 3

    # TensorBoard: the same series, step for step, value for value (double precision), train and eval alike
    assert _tensorboard(ws / "tensorboard" / "toy" / run_id) == series
    hparams = _tensorboard_params(ws / "tensorboard" / "toy" / run_id)  # numbers as numbers, the rest as MLflow's text
    assert set(hparams) == set(run.data.params)
    assert all(v == float(run.data.params[k]) if isinstance(v, float) else str(v)[:500] == run.data.params[k] for k, v in hparams.items())

    # W&B offline: one folder for train, one for eval, both under the MLflow run's id; params and final metrics equal MLflow's
    config, summary, exits = _wandb_run(ws, run_id)
    assert {k: str(v)[:500] for k, v in config.items()} == run.data.params
    assert summary == run.data.metrics  # the last value of each stepped series, and the step-less results
    assert exits == [0, 0]


# -- fast: the fan-out's rules, with a stand-in mirror -----------------------------------------------------------


class _Recorder:
    """A mirror that records what it is given, and raises in the operation it is told to."""

    name = "tensorboard"
    calls: list[tuple[str, Any]] = []

    def __init__(self, recipe: Any, ws: Any, run_id: str, job_type: str | None = None, fail_in: str | None = None) -> None:
        self.fail_in = fail_in
        self.calls.clear()

    def _do(self, op: str, payload: Any) -> None:
        self.calls.append((op, payload))
        if op == self.fail_in:
            raise RuntimeError(f"disk full in {op}")

    def start(self, run_name: str | None, params: dict[str, Any]) -> None:
        self._do("start", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self._do("log_metrics", (metrics, step))

    def finish(self, status: str) -> None:
        self._do("finish", status)


def _light_recipe(make_recipe, tmp_path: Path, **tracking: Any) -> Any:
    return load_recipe(make_recipe(tmp_path / "no-model", tracking={"backends": ["mlflow", "tensorboard"], **tracking}))


def _with_recorder(monkeypatch: pytest.MonkeyPatch, fail_in: str | None) -> None:
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", Backend(lambda *a: _Recorder(*a, fail_in=fail_in), None))


@pytest.mark.parametrize("fail_in", ["start", "log_metrics", "finish"])
def test_a_mirror_that_raises_is_a_warning_and_the_run_finishes(fail_in: str, tmp_path: Path, make_recipe, monkeypatch, store,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    _with_recorder(monkeypatch, fail_in)
    recipe, ws = _light_recipe(make_recipe, tmp_path), store
    with caplog.at_level(logging.WARNING, logger="microtune.registry"):
        with tracked_run(recipe, ws, run_name="r", params={"train.lr": 0.002}) as run:
            run.log_metrics({"loss": 1.5, "note": "text is dropped"}, step=1)
            run.log_metrics({"loss": 1.25}, step=2)
    got = _client(ws.root).get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"train.lr": "0.002"}
    assert [(m.step, m.value) for m in _client(ws.root).get_metric_history(run.run_id, "loss")] == [(1, 1.5), (2, 1.25)]
    assert f"failed in {fail_in}" in got.data.tags[trackers.TAG + "tensorboard"]
    assert "disk full" in caplog.text and run.run_id in caplog.text
    ops = [op for op, _ in _Recorder.calls]
    assert ops[ops.index(fail_in) + 1:] in ([], ["finish"])  # dropped after the failure (allowed to release what it holds)


def test_mirrors_get_the_same_numbers_and_mlflows_final_status(tmp_path: Path, make_recipe, monkeypatch, store) -> None:
    _with_recorder(monkeypatch, None)
    recipe, ws = _light_recipe(make_recipe, tmp_path), store
    with tracked_run(recipe, ws, run_name="r", params={"a": 1}) as run:
        run.log_metrics({"loss": 2, "ok": True, "skip": None}, step=3)
        run.log_metrics({"eval.x.accuracy": 0.5})
    assert _Recorder.calls == [("start", {"a": 1}), ("log_metrics", ({"loss": 2.0, "ok": 1.0}, 3)),
                               ("log_metrics", ({"eval.x.accuracy": 0.5}, None)), ("finish", "FINISHED")]
    first = run.run_id
    with pytest.raises(ValueError), tracked_run(recipe, ws, run_name="r2"):  # a new run whose body fails: FAILED everywhere
        raise ValueError("boom")
    assert _Recorder.calls[-1] == ("finish", "FAILED")
    with pytest.raises(ValueError), tracked_run(recipe, ws, run_id=first):  # a failed eval leaves the finished run FINISHED
        raise ValueError("eval failed")
    assert _Recorder.calls[-1] == ("finish", "FINISHED")
    assert _client(ws.root).get_run(first).info.status == "FINISHED"


# -- recipe and package errors -----------------------------------------------------------------------------------


def test_a_missing_package_is_a_recipe_error_at_check_naming_the_extra(tmp_path: Path, make_recipe, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec gives None, import raises
    recipe = make_recipe(tmp_path / "no-model", tracking={"backends": ["mlflow", "tensorboard", "wandb"]})
    result = CliRunner().invoke(app, ["check", str(recipe), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert "tracking.backends.2: wandb needs the 'wandb' package" in result.output
    assert "pip install 'microtune[trackers]'" in result.output and "Traceback" not in result.output
    with pytest.raises(RecipeError, match="wandb"):  # eval (which runs no check) refuses it the same way, before any run
        trackers.require_backends(load_recipe(recipe))


def test_the_tracker_option_is_the_backends_override(tmp_path: Path, make_recipe, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    recipe = make_recipe(tmp_path / "no-model")
    result = CliRunner().invoke(app, ["train", str(recipe), "-w", str(tmp_path / "ws"), "--tracker", "tensorboard"])
    assert result.exit_code == 2, result.output
    assert "tracking.backends.1: tensorboard needs the 'tensorboard' package" in result.output


@pytest.mark.parametrize(("tracking", "message"), [
    ({"backends": ["wandb", "tensorboard"]}, "lacks mlflow: the model registry, aliases, gate and lineage live in MLflow"),
    ({"backends": ["mlflow", "tensorboard", "tensorboard"]}, "lists tensorboard more than once"),
    ({"backends": ["mlflow", "comet"]}, "Input should be 'mlflow', 'wandb' or 'tensorboard'"),
    ({"wandb": {"project": "p"}}, "tracking.wandb settings are given but wandb is not in tracking.backends"),
])
def test_bad_backends_are_recipe_errors_with_the_reason(tracking: dict[str, Any], message: str, tmp_path: Path, make_recipe) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(make_recipe(tmp_path / "no-model", tracking=tracking))
    assert message in "\n".join(str(p) for p in err.value.problems)


def test_wandb_settings_and_mode(tmp_path: Path, make_recipe, monkeypatch, caplog) -> None:
    recipe = load_recipe(make_recipe(tmp_path / "no-model", tracking={"backends": ["mlflow", "wandb"],
                                                                      "wandb": {"entity": "team", "mode": "online"}}))
    with caplog.at_level(logging.WARNING, logger="microtune.registry"):
        tracker = trackers.WandbTracker(recipe, Workspace.at(tmp_path / "ws"), "abc", "train")
    assert (tracker.project, tracker.entity, tracker.mode) == ("toy", "team", "offline")  # project: the recipe's name
    assert "$WANDB_MODE=offline" in caplog.text  # the environment wins, and says so
    monkeypatch.delenv("WANDB_MODE")
    assert trackers.wandb_mode("online") == "online" and trackers.wandb_mode(None) == "online"


def test_mirror_keys_leave_the_recipe_hash_alone(tmp_path: Path, make_recipe) -> None:
    """Adding a mirror to a run being resumed is the same run (`train --resume` compares recipe hashes)."""
    from microtune.pipeline.lineage import recipe_hash

    plain = load_recipe(make_recipe(tmp_path / "no-model"))
    mirrored = plain.with_overrides(["tracking.backends=[mlflow, wandb]", "tracking.wandb.project=p"])
    assert recipe_hash(plain) == recipe_hash(mirrored)
    assert recipe_hash(plain) != recipe_hash(plain.with_overrides(["train.lr=0.01"]))
