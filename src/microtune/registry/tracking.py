"""MLflow tracking and model registry, on the workspace's SQLite store unless told otherwise.

The URI (tracking and registry alike) is chosen by one rule, ``store_uri``: an explicit URI (the
recipe's ``tracking.uri``, `microtune serve --tracking-uri`), else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<workspace>/mlflow.db`` with artifacts in ``<workspace>/mlartifacts``. Browse it with
``mlflow ui --backend-store-uri sqlite:///.microtune/mlflow.db``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.atomic import alive
from microtune.core.crashpoints import reach
from microtune.core.errors import ArtifactError
from microtune.core.workspace import Workspace

# The user's choice, read once: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ,
# which would otherwise leak one workspace's store into the next run (and into child processes).
_USER_URI = os.environ.get("MLFLOW_TRACKING_URI")


def given_uri(explicit: str | None = None) -> str | None:
    """The store the user chose, if any: ``explicit`` (a recipe's ``tracking.uri``, `serve --tracking-uri`), else
    ``$MLFLOW_TRACKING_URI`` as it was when microtune started."""
    return explicit or _USER_URI


def store_uri(ws: Workspace, explicit: str | None = None) -> str:
    """The MLflow tracking and registry URI: the user's choice (``given_uri``), else the workspace's SQLite store.
    Every stage, `serve` and `models` go through here."""
    return given_uri(explicit) or ws.mlflow_uri


def tracking_uri(recipe: Recipe, ws: Workspace) -> str:
    """The store of a recipe's runs and registered versions: its ``tracking.uri``, else as ``store_uri``."""
    return store_uri(ws, recipe.tracking.uri)


def quiet_mlflow_logs() -> None:
    """MLflow's store (alembic migrations, store and client INFO lines) would flood every command's output."""
    for name in ("alembic", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _mlflow(uri: str) -> Any:
    quiet_mlflow_logs()
    import mlflow

    mlflow.set_tracking_uri(uri)
    if _USER_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = _USER_URI
    return mlflow


def _experiment_id(mlflow: Any, name: str, ws: Workspace, uri: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = ws.mlflow_artifacts.as_uri() if uri == ws.mlflow_uri else None
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def mlflow_run(recipe: Recipe, ws: Workspace, run_id: str | None = None, run_name: str | None = None) -> Iterator[Any]:
    """Start (or resume, with ``run_id``) an MLflow run; it is marked FAILED if the body raises — except a run that had
    already finished (an adapter's training run that `eval` logs into): a failed eval leaves it FINISHED."""
    uri = tracking_uri(recipe, ws)
    mlflow = _mlflow(uri)
    recover_dead_runs(uri)
    if run_id is None:
        exp = _experiment_id(mlflow, recipe.tracking.experiment or recipe.name, ws, uri)
        with mlflow.start_run(experiment_id=exp, run_name=run_name) as run:
            mlflow.set_tags(_owner_tags("RUNNING"))
            reach("tracking.run_started")
            yield run
        return
    before = _status(mlflow, run_id, uri)
    run = mlflow.start_run(run_id=run_id)
    mlflow.set_tags(_owner_tags(before))
    reach("tracking.run_started")
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FINISHED" if before == "FINISHED" else "FAILED")
        raise
    mlflow.end_run()


# -- runs whose process died ------------------------------------------------------------------------------
# A process killed inside `mlflow_run` (kill -9, OOM killer, power cut) never ends its run: MLflow would show it
# RUNNING forever. Every run therefore carries its owner (host, pid, the pid's start time, so a recycled pid is not
# mistaken for the owner) and the status it had before this process opened it; the next command that opens the
# store ends the runs whose owner is gone: KILLED, or back to FINISHED for a finished run that only an `eval`
# logging into it had reopened (the training it records did finish).
OWNER_PID, OWNER_HOST, OWNER_START, STATUS_BEFORE = "microtune.pid", "microtune.host", "microtune.pid_start", "microtune.status_before"
KILLED_TAG = "microtune.killed"
_recovered: set[str] = set()


def _owner_tags(status_before: str) -> dict[str, str]:
    return {OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname(), OWNER_START: _pid_start(os.getpid()),
            STATUS_BEFORE: status_before}


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where /proc cannot tell."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_dead(tags: dict[str, str]) -> bool:
    """True only when the run's owner certainly ran on this host and is gone (or its pid now belongs to another process)."""
    pid = tags.get(OWNER_PID, "")
    if tags.get(OWNER_HOST) != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    if not alive(int(pid)):
        return True
    started = tags.get(OWNER_START, "")
    return bool(started) and _pid_start(int(pid)) not in ("", started)


def recover_dead_runs(uri: str) -> list[str]:
    """End the RUNNING runs of this store whose owner process died (once per store and process); returns their ids."""
    if uri in _recovered:
        return []
    _recovered.add(uri)
    from mlflow.entities import ViewType

    client = _mlflow(uri).MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    ended = []
    for run in client.search_runs(exps, "attributes.status = 'RUNNING'", run_view_type=ViewType.ALL) if exps else []:
        tags = run.data.tags
        if not _owner_dead(tags):
            continue
        status = "FINISHED" if tags.get(STATUS_BEFORE) == "FINISHED" else "KILLED"
        client.set_tag(run.info.run_id, KILLED_TAG, f"process {tags[OWNER_PID]} on {tags[OWNER_HOST]} died before ending the run; "
                                                    f"marked {status} by process {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        client.set_terminated(run.info.run_id, status)
        ended.append(run.info.run_id)
    return ended


def _status(mlflow: Any, run_id: str, uri: str) -> str:
    """The status of an existing run, or an ArtifactError when this store does not hold it (another workspace's)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient(uri).get_run(run_id).info.status
    except MlflowException:
        raise ArtifactError(f"MLflow run {run_id} is not in the tracking store {uri}: the artifact was made with another store",
                            hint="pass the workspace it was trained in (-w DIR), or point tracking.uri / $MLFLOW_TRACKING_URI "
                                 "at its store") from None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def recipe_params(recipe: Recipe) -> dict[str, Any]:
    """A run's parameters: the resolved recipe flattened to ``a.b.c`` keys, values as they are (each tracker shapes them)."""
    return flatten(recipe.resolved())


def log_param_values(params: dict[str, Any]) -> None:
    """Parameters of the active MLflow run, as MLflow keeps them: text, cut at 500 characters."""
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_params(recipe: Recipe) -> None:
    log_param_values(recipe_params(recipe))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def log_folder(folder: Path, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def register_adapter(recipe: Recipe, ws: Workspace, run_id: str, tags: dict[str, Any]) -> str:
    """Register the run's ``adapter`` artifacts as a new version of the model named after the recipe."""
    mlflow = _mlflow(tracking_uri(recipe, ws))
    client = mlflow.MlflowClient()
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(recipe.name, description=f"microtune micro-model: {recipe.task.instruction}")
    source = f"{client.get_run(run_id).info.artifact_uri}/adapter"
    version = client.create_model_version(recipe.name, source, run_id=run_id,
                                          tags={k: str(v)[:5000] for k, v in tags.items() if v is not None})
    return str(version.version)


def model_versions(recipe: Recipe, ws: Workspace) -> list[Any]:
    mlflow = _mlflow(tracking_uri(recipe, ws))
    return list(mlflow.MlflowClient().search_model_versions(f"name='{recipe.name}'"))
