"""Trackers beside MLflow: one fan-out, so a step logs once and every backend of ``tracking.backends`` gets it.

    with tracked_run(recipe, ws, run_name=run_id, params=recipe_params(recipe)) as run:
        run.log_metrics({"loss": 0.41, "lr": 2e-4}, step=10)   # MLflow, W&B and TensorBoard alike
        run.run_id                                              # the MLflow run's id: it names the mirrors' runs

MLflow is the system of record (registry, aliases, gate, lineage: ``tracking.py``); its errors are the step's errors,
and it ends the run by its own rules (``mlflow_run``). The mirrors get what MLflow gets — the parameters, the per-step
training metrics, the step-less results (eval, cost, synth) — and end with the status MLflow gave the run. A mirror that
raises is a warning (logger ``microtune.registry``) and a ``microtune.tracker.<name>`` tag on the MLflow run, and is
dropped for the rest of the run: it never fails a run, nor leaves the MLflow run FAILED.

Where the mirrors write: W&B under ``<workspace>/wandb/`` (its ``offline-run-*`` folders, for `wandb sync`, when
offline), TensorBoard under ``<workspace>/tensorboard/<recipe>/<MLflow run id>/``; the W&B run id is the MLflow run id.
A step that reopens a run (``eval`` logs into the adapter's training run, ``train --resume``) reopens its mirrors too.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from microtune.config import Recipe
from microtune.core.errors import Problem, RecipeError
from microtune.core.progress import Event, Reporter
from microtune.core.workspace import Workspace
from microtune.registry.tracking import log_metrics, log_param_values, mlflow_run, tracking_uri

log = logging.getLogger("microtune.registry")
TAG = "microtune.tracker."  # + backend name: why that mirror stopped mirroring this run
EXTRA = "pip install 'microtune[trackers]'"


class Tracker(Protocol):
    """One backend: a run starts with its name and parameters, takes metrics (at a step, or none for one-off results),
    and finishes with the MLflow run's status (FINISHED, FAILED, KILLED)."""

    name: str

    def start(self, run_name: str | None, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None: ...

    def finish(self, status: str) -> None: ...


# -- the backends ------------------------------------------------------------------------------------------------


class MlflowTracker:
    """Today's MLflow logging, unchanged: the run itself is opened and ended by ``mlflow_run`` (its FAILED/FINISHED rules)."""

    name = "mlflow"

    def __init__(self, recipe: Recipe, ws: Workspace, run_id: str, job_type: str | None = None) -> None:
        self.run_id = run_id

    def start(self, run_name: str | None, params: dict[str, Any]) -> None:
        if params:
            log_param_values(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        log_metrics(metrics, step)

    def finish(self, status: str) -> None:
        """Nothing to do: ``mlflow_run`` ends the run."""


class WandbTracker:
    """A W&B run with the MLflow run's id (``resume="allow"``: eval and ``--resume`` add to it). Stepped metrics go to the
    history at their step; step-less ones (eval, cost, synth results) to the run's summary, where W&B keeps final figures
    — a history row at step 0 after the training steps would be dropped by W&B (steps only grow)."""

    name = "wandb"

    def __init__(self, recipe: Recipe, ws: Workspace, run_id: str, job_type: str | None = None) -> None:
        cfg = recipe.tracking.wandb
        self.run_id, self.root, self.job_type = run_id, ws.root, job_type
        self.project, self.entity, self.mode = cfg.project or recipe.name, cfg.entity, wandb_mode(cfg.mode)
        self.run: Any = None

    def start(self, run_name: str | None, params: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(id=self.run_id, name=run_name, project=self.project, entity=self.entity, dir=str(self.root),
                              mode=self.mode, config=params or None, resume="allow", job_type=self.job_type, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        if step is None:
            self.run.summary.update(metrics)
        else:
            self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def wandb_mode(recipe_mode: str | None) -> str:
    """``$WANDB_MODE`` when set (it wins: a CI or an air-gapped machine forces offline without editing recipes; a warning
    says so when the recipe asked otherwise), else the recipe's ``tracking.wandb.mode``, else online."""
    env = os.environ.get("WANDB_MODE") or None
    if env and recipe_mode and env != recipe_mode:
        log.warning("tracking.wandb.mode is %s but $WANDB_MODE=%s: the environment wins, W&B runs %s", recipe_mode, env, env)
    return env or recipe_mode or "online"


class TensorboardTracker:
    """Event files in ``<workspace>/tensorboard/<recipe>/<MLflow run id>/``: scalars at their step (step-less ones at 0,
    as MLflow records them) in double precision, so they read back equal to MLflow's; parameters as the HParams plugin's (numbers, and text)."""

    name = "tensorboard"

    def __init__(self, recipe: Recipe, ws: Workspace, run_id: str, job_type: str | None = None) -> None:
        self.folder = tensorboard_dir(ws, recipe.name, run_id)
        self.writer: Any = None

    def start(self, run_name: str | None, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.folder))
        if params:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams({k: _hparam(v) for k, v in params.items()}, {}):
                self.writer._get_file_writer().add_summary(summary)

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, 0 if step is None else step, new_style=True, double_precision=True)

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_dir(ws: Workspace, recipe: str, run_id: str) -> Path:
    """A run's TensorBoard folder; ``tensorboard --logdir <workspace>/tensorboard`` shows every recipe's runs."""
    return ws.root / "tensorboard" / recipe / run_id


def _hparam(value: Any) -> int | float | str:
    """Numbers as numbers (the HParams dashboard sorts and filters them), the rest — None, lists, booleans, which torch's
    ``hparams`` would store as 0/1 — as their text, as MLflow shows them."""
    return value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Backend:
    make: Callable[..., Tracker]
    module: str | None  # the package it needs, None: a core dependency


BACKENDS: dict[str, Backend] = {
    "mlflow": Backend(MlflowTracker, None),
    "wandb": Backend(WandbTracker, "wandb"),
    "tensorboard": Backend(TensorboardTracker, "tensorboard"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_backends(recipe: Recipe) -> None:
    """Every backend the recipe names can be imported: a missing package is a recipe error (at `check`, before any run
    starts) that names the extra to install."""
    missing = [(i, name, BACKENDS[name].module) for i, name in enumerate(recipe.tracking.backends)
               if BACKENDS[name].module and not _installed(BACKENDS[name].module)]
    if missing:
        raise RecipeError(f"tracking.backends names {', '.join(n for _, n, _ in missing)}, whose package is not installed",
                          problems=[Problem(f"tracking.backends.{i}", f"{name} needs the {module!r} package", name) for i, name, module in missing],
                          hint=f"{EXTRA} (W&B and TensorBoard), or remove it from tracking.backends")


# -- the fan-out -------------------------------------------------------------------------------------------------


class TrackedRun:
    """The MLflow run and its mirrors. MLflow's errors propagate; a mirror's error drops that mirror (with a warning)."""

    def __init__(self, recipe: Recipe, ws: Workspace, run: Any, trackers: list[Tracker]) -> None:
        self.run, self._recipe, self._ws, self._live = run, recipe, ws, list(trackers)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def backends(self) -> list[str]:
        """The backends still mirroring this run (mlflow first)."""
        return [t.name for t in self._live]

    def start(self, run_name: str | None, params: dict[str, Any] | None) -> None:
        for tracker in list(self._live):
            self._call(tracker, "start", run_name, params or {})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Numbers only (as MLflow always took them); the same values at the same step to every backend."""
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if not clean:
            return
        for tracker in list(self._live):
            self._call(tracker, "log_metrics", clean, step)

    def reporter(self, then: Reporter | None = None) -> Reporter:
        """``metrics`` events go to every backend at their step; every other event to ``then``."""
        def route(event: Event) -> None:
            if event.kind == "metrics":
                self.log_metrics(event.data, event.step)
            elif then is not None:
                then(event)
        return route

    def finish(self, status: str) -> None:
        for tracker in list(self._live):
            if tracker.name != "mlflow":
                self._call(tracker, "finish", status)

    def _call(self, tracker: Tracker, op: str, *args: Any) -> None:
        if tracker.name == "mlflow":
            getattr(tracker, op)(*args)
            return
        try:
            getattr(tracker, op)(*args)
        except Exception as exc:  # a mirror never fails the run: warn, record why on the MLflow run, stop mirroring
            self._live.remove(tracker)
            why = f"{tracker.name} failed in {op} and stopped mirroring this run: {type(exc).__name__}: {exc}"
            log.warning("tracking: %s (MLflow run %s goes on)", why, self.run_id)
            self._tag(TAG + tracker.name, why)
            with contextlib.suppress(Exception):  # let it release what it holds (a writer, a W&B process)
                if op != "finish":
                    tracker.finish("FAILED")

    def _tag(self, key: str, value: str) -> None:
        try:
            import mlflow

            mlflow.MlflowClient(tracking_uri(self._recipe, self._ws)).set_tag(self.run_id, key, value[:5000])
        except Exception as exc:  # the warning above already said it; never let a note mask the run's own outcome
            log.warning("tracking: could not tag MLflow run %s: %s", self.run_id, exc)


def _open(recipe: Recipe, ws: Workspace, run: Any, job_type: str | None) -> list[Tracker]:
    return [BACKENDS[name].make(recipe, ws, run.info.run_id, job_type) for name in recipe.tracking.backends]


@contextlib.contextmanager
def tracked_run(recipe: Recipe, ws: Workspace, run_id: str | None = None, run_name: str | None = None,
                params: dict[str, Any] | None = None, job_type: str | None = None) -> Iterator[TrackedRun]:
    """Open (or, with ``run_id``, reopen) the MLflow run as ``mlflow_run`` does, with the recipe's mirrors; ``params`` are
    logged to every backend at the start. The mirrors finish with the status MLflow ended the run with.
    ``job_type`` (train, eval, synth, tune) labels the W&B run."""
    require_backends(recipe)
    live: TrackedRun | None = None
    failed = False
    try:
        with mlflow_run(recipe, ws, run_id=run_id, run_name=run_name) as run:
            live = TrackedRun(recipe, ws, run, _open(recipe, ws, run, job_type))
            live.start(run_name, params)
            yield live
    except BaseException:
        failed = True
        raise
    finally:
        if live is not None:
            live.finish(_ended(recipe, ws, live.run_id, failed))


def _ended(recipe: Recipe, ws: Workspace, run_id: str, failed: bool) -> str:
    """The status MLflow ended the run with (an eval that fails leaves a finished training run FINISHED)."""
    try:
        import mlflow

        return str(mlflow.MlflowClient(tracking_uri(recipe, ws)).get_run(run_id).info.status)
    except Exception:
        return "FAILED" if failed else "FINISHED"
