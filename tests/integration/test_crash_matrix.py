"""The crash matrix (issue 18 item 3): kill -9 each command at named points, rerun it, check the workspace recovered.

Each cell runs the real CLI in a subprocess with $MICROTUNE_CRASH_AT naming a point of core/crashpoints.py
(the process SIGKILLs itself there: no cleanup runs), asserts it died by SIGKILL, reruns the command without the
variable and checks the invariants: no temp leftovers (``.tmp-*``, ``*.tmp``, ``.old-*``) anywhere in the
workspace, no MLflow run left RUNNING, no registered version whose files are missing, every artifact complete
(manifest + the files of its kind), and the rerun converged to an uninterrupted run of the same command
(same dataset, same adapter weights, same eval metrics, same synthetic rows, same registered versions).
The uninterrupted references are computed once per module, lazily (a fast cell pays only for its own). A cell costs
two or three CLI processes (~10 s each on a 2-core CPU), so only one is fast; the rest are marked slow.
Four cells (a first run, a resume from a checkpoint, register→alias, gate→promote) are not `exhaustive`; the one
fast cell runs in `make test`, the others in `make test-slow` (CI runs both).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import microtune
from microtune.core import crashpoints
from toydata import LABELS, TEXTS, toy_rows, write_jsonl

SRC = Path(microtune.__file__).resolve().parents[1]
NAME = "toy"
ARTIFACT_FILES = {  # what a complete artifact of each kind holds besides manifest.json
    "datasets": ["train.jsonl", "test.jsonl"],
    "adapters": ["adapter_config.json", "adapter_model.safetensors", "recipe.json", "tokenizer.json"],
    "evals": ["predictions.jsonl", "metrics.json", "stats.json", "report.html"],
    "synthetic": ["accepted.jsonl", "rejected.jsonl", "recipe.json"],
}
MAIN_METRICS = ("accuracy", "macro_f1", "valid_rate", "examples")


@dataclass(frozen=True)
class Cell:
    command: str          # train | synth | eval | run | watch
    point: str            # POINT or POINT@N (see core/crashpoints.py)
    rerun: tuple[str, ...] = ()  # extra arguments of the rerun (e.g. --resume)
    crash_args: tuple[str, ...] = ()  # extra arguments of the killed run and its rerun
    slow: bool = True
    exhaustive: bool = True  # `make test-exhaustive`; all cells run in CI (`make test` + `make test-slow`)

    @property
    def id(self) -> str:
        return f"{self.command}-{self.point.replace('@', '-')}"


CELLS = [
    Cell("train", "tracking.run_started", slow=False, exhaustive=False),
    Cell("train", "atomic.before_rename@2"),  # 1: the dataset, 2: the adapter folder of this run (a rerun writes another)
    Cell("train", "atomic.file_before_rename"),
    Cell("train", "train.after_checkpoint@2", rerun=("--resume",), crash_args=("--set", "train.save_steps=1"), exhaustive=False),
    Cell("train", "train.after_artifact"),
    Cell("synth", "synth.after_answers"),
    Cell("eval", "eval.after_predictions"),
    Cell("run", "run.before_register"),
    Cell("run", "registry.before_alias", exhaustive=False),
    Cell("watch", "watch.after_ingest"),
    Cell("watch", "gate.before_promote", exhaustive=False),
]


def test_every_crash_point_is_reached_by_some_cell() -> None:
    """The table in core/crashpoints.py and the matrix cannot drift apart: each cell's SIGKILL proves its point is reached."""
    assert {c.point.partition("@")[0] for c in CELLS} == set(crashpoints.POINTS)


def test_an_unknown_crash_point_is_refused() -> None:
    with pytest.raises(ValueError, match="names no crash point"):
        crashpoints._target("train.nowhere")
    with pytest.raises(ValueError, match="whole number"):
        crashpoints._target("train.after_checkpoint@0")
    assert crashpoints._target("train.after_checkpoint@2") == ("train.after_checkpoint", 2) and crashpoints._target("") is None


# -- the lab: data, recipes, the fake teacher, references ----------------------------------------------------------------
class Lab:
    def __init__(self, root: Path, model_dir: Path, teacher_url: str):
        self.root = root
        write_jsonl(root / "train.jsonl", toy_rows(4))
        write_jsonl(root / "test.jsonl", [{"text": TEXTS[lb][i], "label": lb} for i in (6, 7) for lb in LABELS])
        (root / "inbox").mkdir()
        write_jsonl(root / "inbox" / "new.jsonl", [{"text": f"gift card {i} does not work", "label": "giftcard"} for i in range(8)])
        recipe: dict[str, Any] = {
            "name": NAME, "task": {"type": "classify", "instruction": "Route the customer message.", "labels": LABELS},
            "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}}, "model": {"base": str(model_dir)},
            "train": {"max_steps": 3, "batch_size": 4, "max_seq_len": 96, "lr": 2e-3, "log_every": 1},
            "eval": {"shots": 1, "batch_size": 6, "baselines": []},
            "watch": {"inbox": "inbox", "min_new_rows": 8, "new_label_min_rows": 3, "min_rows_for_tests": 100, "holdout": 0.25,
                      "retrain": ["train.max_steps=2"]},
            "synth": {"per_label": 3, "examples_per_request": 2, "exemplars": 2, "mix": {"enabled": False},
                      "teacher": {"base_url": teacher_url, "model": "fake-teacher", "concurrency": 2, "max_attempts": 2},
                      "fidelity": {"folds": 2, "max_auc": 1.0}, "filters": {"length_slack": 2.0}},
        }
        self.recipe = root / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
        self.refs: dict[str, dict[str, Any]] = {}
        self.n = 0

    def cli(self, ws: Path, *args: str, crash: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in (crashpoints.ENV, "MLFLOW_TRACKING_URI")}
        env["PYTHONPATH"] = str(SRC)
        if crash:
            env[crashpoints.ENV] = crash
        return subprocess.run([sys.executable, "-m", "microtune.cli", *args, "-w", str(ws)], capture_output=True, text=True,
                              timeout=600, cwd=self.root, env=env)

    def ok(self, ws: Path, *args: str) -> None:
        proc = self.cli(ws, *args)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"

    def workspace(self) -> Path:
        self.n += 1
        return self.root / f"ws{self.n}"

    def command(self, command: str) -> list[str]:
        """The command line of a cell's command (``eval`` and ``watch`` need what ``setup`` made first)."""
        return {"watch": ["watch", str(self.recipe), "--once"]}.get(command, [command, str(self.recipe)])

    def setup(self, command: str, ws: Path) -> None:
        """What must exist before the command runs: an adapter for eval, a champion for watch."""
        if command == "eval":
            self.ok(ws, "train", str(self.recipe))
        elif command == "watch":
            self.ok(ws, "run", str(self.recipe))

    def reference(self, command: str) -> dict[str, Any]:
        """The state an uninterrupted run of ``command`` leaves (once per module and command)."""
        if command not in self.refs:
            ws = self.workspace()
            self.setup(command, ws)
            self.ok(ws, *self.command(command))
            assert_recovered(ws)
            self.refs[command] = summary(ws)
        return self.refs[command]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from fake_teacher import FakeTeacher

    with FakeTeacher() as teacher:
        yield Lab(tmp_path_factory.mktemp("crash"), tiny_model_dir, teacher.url)


# -- invariants ----------------------------------------------------------------------------------------------------------
def leftovers(ws: Path) -> list[Path]:
    """Temp files and folders of atomic writers (``.X.tmp-<pid>-…``, ``.X.old-<pid>-…``, ``.X.<hex>.tmp``)."""
    return sorted(p for p in ws.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp"))


def _client(ws: Path) -> Any:
    from microtune.registry.models import registry_client

    return registry_client(f"sqlite:///{ws / 'mlflow.db'}")


def _runs(ws: Path) -> list[Any]:
    from mlflow.entities import ViewType

    client = _client(ws)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(exps, run_view_type=ViewType.ALL)) if exps else []


def _versions(ws: Path) -> list[Any]:
    from microtune.registry.models import list_versions

    client = _client(ws)
    return [v for m in client.search_registered_models() for v in list_versions(client, m.name)]


def assert_recovered(ws: Path) -> None:
    """The invariants every workspace must satisfy after a (re)run that exited 0."""
    from microtune.registry.models import artifact_exists

    assert leftovers(ws) == []
    assert [(r.info.run_id, r.data.tags.get("mlflow.runName")) for r in _runs(ws) if r.info.status == "RUNNING"] == []
    for v in _versions(ws):
        assert artifact_exists(v.source), f"version {v.version}: {v.source} is missing"
        assert (Path(v.tags["adapter_dir"]) / "manifest.json").is_file(), f"version {v.version}: adapter_dir is incomplete"
    for stage, files in ARTIFACT_FILES.items():
        folder = ws / NAME / stage
        for artifact in sorted(folder.iterdir()) if folder.is_dir() else []:
            missing = [f for f in ["manifest.json", *files] if not (artifact / f).is_file()]
            assert not missing, f"{artifact} is incomplete: no {missing}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(ws: Path) -> dict[str, Any]:
    """What an uninterrupted run and a rerun after a crash must agree on; sets, since a crash after an artifact was
    written (before its run ended) leaves a complete, identical extra copy."""
    stage = ws / NAME

    def each(name: str) -> list[Path]:
        return sorted(p for p in (stage / name).iterdir() if not p.name.startswith(".")) if (stage / name).is_dir() else []

    def rows(path: Path) -> str:  # the rows and their scores; provenance differs (`cached`: the rerun's answers come from the cache)
        return json.dumps([{k: v for k, v in json.loads(line).items() if k != "provenance"} for line in path.read_text().splitlines()])

    def micro(p: Path) -> str:
        return json.dumps({k: v for k, v in json.loads((p / "metrics.json").read_text())["micro"].items() if k in MAIN_METRICS})

    return {"datasets": sorted({p.name for p in each("datasets")}),
            "adapters": sorted({_sha(p / "adapter_model.safetensors") for p in each("adapters")}),
            "evals": sorted({micro(p) for p in each("evals")}),
            "synthetic": sorted({rows(p / "accepted.jsonl") for p in each("synthetic")}),
            "versions": sorted((v.version, tuple(v.aliases), v.tags.get("gate.verdict"), v.tags.get("metric.micro.accuracy"))
                               for v in _versions(ws)) if (ws / "mlflow.db").exists() else []}


# -- the cells -----------------------------------------------------------------------------------------------------------
def _marks(c: Cell) -> list[Any]:
    return [m for m, on in ((pytest.mark.slow, c.slow), (pytest.mark.exhaustive, c.exhaustive)) if on]


@pytest.mark.parametrize("cell", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CELLS])
def test_crash_then_rerun_recovers(lab: Lab, cell: Cell) -> None:
    ws = lab.workspace()
    lab.setup(cell.command, ws)
    command = [*lab.command(cell.command), *cell.crash_args]
    killed = lab.cli(ws, *command, crash=cell.point)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {cell.point} (rc {killed.returncode}): {killed.stderr[-3000:]}"
    lab.ok(ws, *command, *cell.rerun)
    assert_recovered(ws)
    dead = [r for r in _runs(ws) if "microtune.killed" in r.data.tags]
    if cell.point.startswith(("tracking.", "train.", "synth.", "eval.")):  # killed inside an MLflow run: it was ended for it
        assert dead and all(r.info.status in ("KILLED", "FINISHED") for r in dead)
    expected, got = lab.reference(cell.command), summary(ws)
    assert got == expected


# -- the recovery paths, in process (fast) -------------------------------------------------------------------------------
def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)  # a process that has exited


def test_runs_of_dead_owners_are_ended_and_others_are_left_alone(tmp_path: Path) -> None:
    import socket

    from microtune.registry import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking._mlflow(uri).MlflowClient(uri)
    exp = client.create_experiment("x")
    host, dead = socket.gethostname(), str(_dead_pid())
    owners = {"killed": {tracking.OWNER_HOST: host, tracking.OWNER_PID: dead, tracking.STATUS_BEFORE: "RUNNING"},
              "reopened": {tracking.OWNER_HOST: host, tracking.OWNER_PID: dead, tracking.STATUS_BEFORE: "FINISHED"},
              "live": {tracking.OWNER_HOST: host, tracking.OWNER_PID: str(os.getppid()), tracking.OWNER_START: tracking._pid_start(os.getppid())},
              "recycled": {tracking.OWNER_HOST: host, tracking.OWNER_PID: str(os.getppid()), tracking.OWNER_START: "1"},
              "elsewhere": {tracking.OWNER_HOST: host + "-other", tracking.OWNER_PID: dead},
              "untagged": {}}
    ids = {name: client.create_run(exp, tags=tags, run_name=name).info.run_id for name, tags in owners.items()}
    ended = tracking.recover_dead_runs(uri)
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"killed": "KILLED", "reopened": "FINISHED", "live": "RUNNING", "recycled": "KILLED", "elsewhere": "RUNNING",
                      "untagged": "RUNNING"}
    assert sorted(ended) == sorted(ids[n] for n in ("killed", "reopened", "recycled"))
    assert f"process {dead} on {host} died" in client.get_run(ids["killed"]).data.tags[tracking.KILLED_TAG]
    assert tracking.recover_dead_runs(uri) == []  # once per store and process


def test_a_version_whose_files_are_gone_is_refused_clearly(tmp_path: Path) -> None:
    from microtune.registry.models import RegistryError, adapter_path, get_version, registry_client

    client = registry_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    client.create_model_version("m", str(tmp_path / "gone"), tags={"adapter_dir": str(tmp_path / "gone-too")})
    with pytest.raises(RegistryError, match="version 1 of 'm' points at missing files") as err:
        adapter_path(client, get_version(client, "m", "1"))
    assert "gone-too" in str(err.value) and "register a new version" in err.value.hint
