"""The tune step: an Optuna search (TPE, hopeless trials pruned on the validation loss) over the recipe's `tune` space.

    result = tune("recipes/banking-intents.yaml", trials=20, budget_s=1200)
    result.tuned_recipe          # recipes/banking-intents.tuned.yaml: the original plus the best overrides

Each trial trains on the train split and is scored on the **valid** split (the test split is never read: it stays
the untouched estimate that `eval` and the gate use); ``tune.holdout`` moves a share of train into that selection set
(``selection_split``) where valid is too small to tell settings apart. The study lives in an RDB storage (default
``sqlite:///<ws>/<recipe>/tune/study.db``), so trials run in parallel processes (``workers``), on several machines
(one `--storage` database, the same `--study`), and a rerun after a crash continues the study: finished trials are
kept, a trial left RUNNING by a dead process on this host is marked FAIL and run again. ``trials`` is the study's
total; at ``budget_s`` no new trial starts and a running one stops at its next step (PRUNED, ``stopped: budget``),
unless no trial of the study has completed yet: that one finishes, so a search always ends with a best recipe.

Outputs in ``<ws>/<recipe>/tune/<study>/``: trials.csv, importances.json, history.png, summary.json; each trial
is an MLflow run nested under the study's run. Events: stage ``tune`` (``start``, a ``message`` per finished
trial, ``done``) and the training engine's ``train`` events of every trial this process runs.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import math
import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml

import microtune.methods as methods
from microtune.config import ParamRange, Recipe, TrainConfig, apply_override, load_recipe
from microtune.core.artifacts import write_artifact
from microtune.core.atomic import alive, write_json, write_text
from microtune.core.errors import InputError, MicrotuneError, RecipeError
from microtune.core.hashing import hash_value
from microtune.core.progress import Event, Reporter, emitter
from microtune.core.workspace import Workspace
from microtune.data import read_split
from microtune.evaluation import score_examples
from microtune.models import resolve_base
from microtune.pipeline.check import check
from microtune.pipeline.recipes import RecipeLike, recipe_json
from microtune.registry import TrackedRun, log_folder, tracked_run
from microtune.synthesis import synthetic_for_training
from microtune.tasks import TASKS
from microtune.training import train_adapter
from microtune.training.defaults import data_defaults
from microtune.training.setup import resolve_balance

OWNER = "microtune.owner"  # trial user attr: the process running it (host, pid, pid start), to fail it when that process dies
PARENT_RUN = "mlflow_parent_run_id"  # study user attr: the MLflow run the trials' runs are nested under
FROM_RECIPE = "microtune.from_recipe"  # trial user attr: the first trial of a new study, the recipe's own settings
RECIPE_HASH = "recipe_hash"  # study user attr: the recipe (less its tune section) the study searches around
STOPPED = "microtune.stopped"  # trial user attr of a pruned trial: what stopped it, "pruner" or "budget"


@dataclass
class TuneResult:
    study: str
    storage: str
    folder: Path  # trials.csv, importances.json, history.png, summary.json
    tuned_recipe: Path | None  # None when no trial completed
    metric: str
    best_value: float | None
    best_params: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # the best trial's `a.b=value` overrides (as `--set` takes them)
    importances: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # trials by state


@dataclass(frozen=True)
class _Job:
    """What every worker process needs to run trials of one study (picklable: spawned workers get a copy)."""

    recipe: Recipe
    workspace: Path
    storage: str
    study: str
    trials: int | None
    deadline: float | None  # time.time() after which no trial starts and a running one stops (once one has completed)
    lock: Path | None  # serialises "count, then start a trial" between this machine's processes (any storage)
    dataset_dir: Path
    labels: list[str]
    metric: str
    direction: str
    extra_train: list[dict[str, Any]]
    declared: Recipe  # the recipe as written: a trial chooses its `auto` training settings after its own overrides
    stats: dict[str, Any]  # the dataset's statistics (training/defaults.py chooses from them)

    def trial_recipe(self, overrides: list[str]) -> Recipe:
        """The recipe a trial trains: the declared one with the trial's overrides, then its `auto` settings chosen from
        the data (a trial that draws batch size 16 gets the epochs of batch 16; one that draws full fine-tuning, its lr)."""
        return data_defaults(self.declared.with_overrides(overrides), self.stats, len(self.extra_train))[0]


def tune(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
         reporter: Reporter | None = None, *, trials: int | None = None, budget_s: float | None = None, workers: int = 1,
         storage: str | None = None, study: str | None = None) -> TuneResult:
    """Search the recipe's `tune` space until the study has ``trials`` trials or ``budget_s`` seconds have passed;
    write the best recipe next to the original (``<name>.tuned.yaml``) and the study's tables and plot."""
    if trials is None and budget_s is None:
        raise InputError("tune needs a stopping rule: the number of trials and/or a time budget",
                         hint="pass --trials N and/or --budget 20m (trials=… / budget_s=… in Python)")
    if workers < 1 or (trials is not None and trials < 1) or (budget_s is not None and budget_s <= 0):
        raise InputError(f"workers, trials and budget must be positive, got workers={workers} trials={trials} budget_s={budget_s}",
                         hint="e.g. --workers 2 --trials 20 --budget 20m")
    source = Path(recipe) if not isinstance(recipe, Recipe) else None
    checked = check(recipe, overrides, workspace)
    ws = Workspace.at(workspace)
    extra = _extra_train(checked.recipe, ws, checked)
    base = data_defaults(checked.declared or checked.recipe, checked.manifest["stats"], len(extra))[0]
    if not checked.manifest["stats"]["rows"].get("valid"):
        raise RecipeError(f"recipe {base.name!r} has no valid split: tune scores every trial on it (never on test)",
                          hint="give data.valid, or hold part of train out with data.split.valid (e.g. 0.1)")
    folder = ws.stage_dir(base.name, "tune")
    folder.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{folder / 'study.db'}"
    name = study or base.name
    metric = base.tune.metric or base.metric_names()[0]
    emit = emitter(reporter, "tune")
    dataset_dir = checked.dataset_dir
    if base.tune.holdout:
        dataset_dir, held, kept = selection_split(checked.dataset_dir, base, folder / name / "data")
        emit("message", text=f"tune: {held} train rows held out (tune.holdout {base.tune.holdout:g}): trials train on {kept} "
                             f"and are scored on valid + those {held}")
    job = _Job(base, ws.root, url, name, trials, None if budget_s is None else time.time() + budget_s,
               folder / f".{name}.lock", dataset_dir,
               checked.manifest["labels"], metric, "minimize" if metric == "valid_loss" else "maximize", extra,
               checked.declared or checked.recipe, checked.manifest["stats"])
    optuna_study = _open_study(job)
    _check_same_recipe(optuna_study, base, name)
    _parent_run(optuna_study, base, ws)
    _start_from_recipe(job, optuna_study)
    # no total on the tune events: the console draws one live bar at a time, and that is each trial's training bar
    emit("start", step=_finished(optuna_study), study=name, storage=url, metric=metric, trials=trials, workers=workers)
    children = [_spawn(job, i) for i in range(1, workers)]
    try:
        _optimize(job, 0, reporter)
    finally:
        for child in children:
            child.join()
    failed = [c.exitcode for c in children if c.exitcode]
    if failed:
        emit("message", text=f"{len(failed)} worker process(es) ended with an error (exit codes {failed}); their trials are marked FAIL")
    result = _summarise(job, _open_study(job), source, overrides or [], folder / name)
    emit("done", step=sum(result.counts.values()), best=result.best_value)
    return result


# -- the study -------------------------------------------------------------------------------------------------


def _local_sqlite(url: str) -> bool:
    return url.startswith("sqlite:///")


def _storage(job: _Job) -> Any:
    """The study's RDB storage (SQLite file, PostgreSQL, MySQL): one per process."""
    import optuna

    if _local_sqlite(job.storage):
        Path(job.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(job.storage, engine_kwargs=_engine(job.storage))
    except ImportError as exc:
        raise InputError(f"storage {job.storage}: {exc}", hint="install the database driver (e.g. psycopg2 for postgresql://)") from None
    except Exception as exc:  # SQLAlchemy's URL and connection errors: the option's value is what is wrong
        raise InputError(f"storage {job.storage!r} cannot be opened: {exc}",
                         hint="give an RDB URL: sqlite:///path/study.db, postgresql://user@host/db or mysql://user@host/db") from None


def _open_study(job: _Job, storage: Any = None, seed_offset: int = 0) -> Any:
    """The study in its storage, created by the first process (``load_if_exists``): TPE and the recipe's pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the library never prints: trials are reported as events
    cfg = job.recipe.tune
    seed = None if cfg.seed is None else cfg.seed + seed_offset
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_steps)
              if cfg.pruner == "median" else optuna.pruners.NopPruner())
    try:
        return optuna.create_study(storage=storage or _storage(job), study_name=job.study, direction=job.direction, sampler=sampler,
                                   pruner=pruner, load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study of the other direction
        raise InputError(f"study {job.study!r} in {job.storage}: {exc}", hint="pick another --study NAME") from None


def _engine(url: str) -> dict[str, Any]:
    """SQLite shared by processes: wait for a writer's lock instead of failing at once."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def _check_same_recipe(study: Any, recipe: Recipe, name: str) -> None:
    """A study searches around one recipe: resuming it with other data or settings would mix incomparable trials (a
    held-out share changes what trials train on and are scored by)."""
    held = {"tune.holdout": recipe.tune.holdout} if recipe.tune.holdout else {}
    key = hash_value({k: v for k, v in recipe.resolved().items() if k != "tune"} | held)
    known = study.user_attrs.get(RECIPE_HASH)
    if known is None:
        study.set_user_attr(RECIPE_HASH, key)
    elif known != key:
        raise InputError(f"study {name!r} was started with another recipe (its data or settings, --set included, changed)",
                         hint="rerun with the recipe as it was to resume, or start a new study with --study NEW_NAME")


def _parent_run(study: Any, recipe: Recipe, ws: Workspace) -> str:
    """The study's MLflow run, created once; every trial's run is nested under it (``mlflow.parentRunId``)."""
    run_id = study.user_attrs.get(PARENT_RUN)
    if run_id is None:
        with tracked_run(recipe, ws, run_name=f"tune-{study.study_name}", job_type="tune") as run:
            import mlflow

            mlflow.set_tags({"microtune.tune.study": study.study_name, "microtune.tune.direction": study.direction.name.lower()})
            run_id = run.run_id
        study.set_user_attr(PARENT_RUN, run_id)
    return run_id


def recipe_point(recipe: Recipe, train_labels: list[str | None] | None = None) -> dict[str, Any]:
    """The recipe's own settings as a point of its search space: each searched path at the recipe's value (after the
    defaults chosen from the data; ``train.balance: auto`` as training resolves it for ``train_labels``), left out where
    that value lies outside the space (the sampler draws it then)."""
    kind = recipe.method.kind
    if recipe.train.balance == "auto" and train_labels is not None:
        recipe = recipe.with_overrides([f"train.balance={resolve_balance('auto', train_labels)}"])
    point: dict[str, Any] = {}
    if recipe.tune.methods:
        if kind not in recipe.tune.methods:
            return {}  # the recipe's own kind is not searched: its settings are no point of this space
        point["method.kind"] = kind
    for path, spec in search_space(recipe, kind).items():
        if path == "train.balance_power" and recipe.train.balance == "none":
            continue
        section, _, field = path.partition(".")
        value = getattr(recipe.train if section == "train" else recipe.method, field, None)
        inside = value in spec.choices if spec.choices is not None else \
            isinstance(value, int | float) and not isinstance(value, bool) and spec.low <= value <= spec.high
        if inside:
            point[path] = value
    return point


def _start_from_recipe(job: _Job, study: Any) -> None:
    """A new study's first trial is the recipe's own settings: a tuned recipe must beat them on valid to replace them
    (ties keep the recipe's: ``_best``), so tuning never hands back settings that scored worse than the defaults."""
    with _locked(job.lock):
        if study.get_trials(deepcopy=False):
            return
        labels = [r.get("label") for r in read_split(job.dataset_dir, "train") + list(job.extra_train)]
        study.enqueue_trial(recipe_point(job.recipe, labels), user_attrs={FROM_RECIPE: True}, skip_if_exists=True)


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# -- workers ---------------------------------------------------------------------------------------------------


def _spawn(job: _Job, index: int) -> multiprocessing.process.BaseProcess:
    """A worker process of its own (spawned: a fresh interpreter, no forked torch state); it reports nothing."""
    process = multiprocessing.get_context("spawn").Process(target=_optimize, args=(job, index, None), name=f"tune-worker-{index}")
    process.start()
    return process


def _optimize(job: _Job, index: int, reporter: Reporter | None) -> None:
    """Run trials until the study holds ``job.trials`` (finished or running) or the deadline has passed."""
    import optuna

    storage = _storage(job)
    seen = len(_open_study(job, storage).get_trials(deepcopy=False))
    study = _open_study(job, storage, seed_offset=index + seen)  # workers and reruns draw different random starts
    ref = resolve_base(job.recipe.model)
    while (trial := _next_trial(job, study, storage)) is not None:
        started = time.time()
        try:
            value = _objective(job, study, trial, ref, reporter)
        except optuna.TrialPruned as exc:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            _report(reporter, study, trial, f"stopped: {exc}" if trial.user_attrs.get(STOPPED) == "budget" else "pruned")
        except RecipeError as exc:  # a combination the recipe rules refuse (e.g. packing with prompt tuning): this trial only
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            _report(reporter, study, trial, f"failed: {exc.message}")
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)
            _report(reporter, study, trial, f"{job.metric} {value:.4f}")
            _warn_short_budget(job, trial, time.time() - started, reporter)


def _next_trial(job: _Job, study: Any, storage: Any) -> Any:
    """A new trial, or None when the study is full or the budget spent. Dead processes' trials are failed first, and
    counting and starting happen under a file lock, so workers on one machine start exactly the trials asked for.
    Past the budget a trial still starts while no trial of the study has run (the set-up can outlast a short budget),
    so a search ends with a best recipe unless its trials fail."""
    from optuna.trial import TrialState

    with _locked(job.lock):
        _fail_dead_trials(study, storage)
        live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if job.trials is not None and len(live) >= job.trials:
            return None
        if job.deadline is not None and time.time() >= job.deadline and \
                study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)):
            return None
        trial = study.ask()
        trial.set_user_attr(OWNER, {"host": socket.gethostname(), "pid": os.getpid(), "start": _pid_start(os.getpid())})
    return trial


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fail_dead_trials(study: Any, storage: Any) -> list[int]:
    """Mark FAIL the RUNNING trials whose process died on this host (a crash, kill -9); their numbers. A rerun of the
    same command on that host therefore resumes the study: those trials are run again as new ones."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    dead: list[int] = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER) or {}
        if owner.get("host") != socket.gethostname() or owner.get("pid") == os.getpid():
            continue
        pid = int(owner.get("pid", 0))
        if pid and (not alive(pid) or (owner.get("start") and _pid_start(pid) not in ("", owner["start"]))):
            with contextlib.suppress(UpdateFinishedTrialError):  # another worker got there first
                storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number), state=TrialState.FAIL)
                dead.append(t.number)
    return dead


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where /proc cannot tell: a recycled pid is not its owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _report(reporter: Reporter | None, study: Any, trial: Any, outcome: str) -> None:
    emit = emitter(reporter, "tune")
    best = _best(study)
    best_text = f"; best so far trial {best.number}: {best.value:.4f}" if best is not None else ""
    own = " (the recipe's own settings)" if trial.user_attrs.get(FROM_RECIPE) else ""
    emit("message", text=f"tune: trial {trial.number}{own} {outcome}{best_text}")


def _warn_short_budget(job: _Job, trial: Any, seconds: float, reporter: Reporter | None) -> None:
    """Once the recipe's own trial has completed: say so when a trial as long no longer fits in the budget left, since
    the search can then only hand back the recipe's own settings (the first trial to complete is never cut)."""
    if job.deadline is None or not trial.user_attrs.get(FROM_RECIPE):
        return
    left = max(0.0, job.deadline - time.time())
    if left < seconds:
        emitter(reporter, "tune")("message", text=(
            f"tune: the recipe's own settings took {seconds / 60:.1f} min to train and score and {left / 60:.1f} min of the budget "
            "remain: a trial as long cannot complete, so this search can only return the recipe's own settings; give a --budget "
            f"of several trials (a second one needs about {2 * seconds / 60:.0f} min in all) or run --workers on more cores"))


def _best(study: Any) -> Any:
    """The best completed trial; among equal scores the earliest (the recipe's own settings when they tie)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    return max(done, key=lambda t: (sign * t.value, -t.number)) if done else None


# -- one trial -------------------------------------------------------------------------------------------------


def _objective(job: _Job, study: Any, trial: Any, ref: Any, reporter: Reporter | None) -> float:
    """Train with the trial's settings on train, score on valid; the validation loss of each eval step goes to the pruner."""
    import mlflow
    import optuna

    overrides = suggest(trial, job.recipe)
    trial.set_user_attr("overrides", overrides)
    recipe = job.trial_recipe(overrides)
    with tracked_run(recipe, Workspace(job.workspace), run_name=f"{job.study}-trial-{trial.number}", params=dict(trial.params),
                     job_type="tune") as run:
        mlflow.set_tags({"mlflow.parentRunId": study.user_attrs[PARENT_RUN], "microtune.tune.study": job.study,
                         "microtune.tune.trial": str(trial.number)})
        try:
            value = _train_and_score(job, recipe, trial, ref, reporter, run)
        except optuna.TrialPruned:
            mlflow.set_tags({"microtune.tune.state": "PRUNED", "microtune.tune.stopped": trial.user_attrs.get(STOPPED, "pruner")})
            raise
        mlflow.set_tag("microtune.tune.state", "COMPLETE")
        run.log_metrics({f"valid.{job.metric}": value})
    return value


def _train_and_score(job: _Job, recipe: Recipe, trial: Any, ref: Any, reporter: Reporter | None, run: TrackedRun) -> float:
    root = Path(job.workspace) / recipe.name / "tune" / job.study
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-", dir=root) as scratch:
        adapter = Path(scratch) / "adapter"
        with write_artifact(adapter, "adapter", {"recipe": recipe.name, "labels": job.labels}) as (tmp, manifest):
            out = train_adapter(recipe, ref, job.dataset_dir, job.labels, tmp, reporter=_pruning(trial, job, reporter, run),
                                extra_train=job.extra_train)
            write_text(tmp / "recipe.json", recipe_json(recipe))
            manifest.update(method=out["method"], final=out["final"])
        if job.metric == "valid_loss":
            return float(out["final"]["best_valid_loss"])
        scores = score_examples(recipe, ref, adapter, read_split(job.dataset_dir, "valid"))
    run.log_metrics({f"valid.{k}": v for k, v in scores.items() if isinstance(v, (int, float))})
    value = scores.get(job.metric)
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise RecipeError(f"trial {trial.number}: the valid split gave no {job.metric!r} (got {value!r})",
                          hint="pick tune.metric among the task's metrics, or valid_loss")
    return float(value)


def _budget_spent(job: _Job, study: Any, trial: Any) -> bool:
    """Past the deadline, with a completed trial in the study to stand as the best (the first one to finish is never cut)."""
    from optuna.trial import TrialState

    if job.deadline is None or time.time() < job.deadline:
        return False
    return any(t.number != trial.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _pruning(trial: Any, job: _Job, reporter: Reporter | None, run: TrackedRun) -> Reporter:
    """The training engine's events as the trial's hook: each validation loss is reported to the trial (negated when the
    study maximises a task metric, so lower loss reads as better) and the trial stops when the pruner says so, or at its
    next step once the time budget is spent (``_budget_spent``); metrics go to the trial's MLflow run and its mirrors,
    everything else to the caller's reporter."""
    import optuna

    sign = 1.0 if job.direction == "minimize" else -1.0

    def route(event: Event) -> None:
        if event.step is not None and _budget_spent(job, trial.study, trial):
            trial.set_user_attr(STOPPED, "budget")
            raise optuna.TrialPruned(f"the time budget was spent at step {event.step}")
        if event.kind == "metrics":
            run.log_metrics(event.data, event.step)
            if "valid_loss" in event.data and event.step is not None:
                trial.report(sign * float(event.data["valid_loss"]), event.step)
                if trial.should_prune():
                    trial.set_user_attr(STOPPED, "pruner")
                    raise optuna.TrialPruned(f"validation loss {event.data['valid_loss']:.4f} at step {event.step}")
        elif reporter is not None:
            reporter(event)
    return route


def selection_split(dataset_dir: Path, recipe: Recipe, out: Path) -> tuple[Path, int, int]:
    """The data the trials see when ``tune.holdout`` is set: train less a held-out share (stratified by label; tasks
    without labels form one stratum), valid with those rows added; no test file. Deterministic (``tune.seed``), so a
    resumed study or another worker gets the same rows. ``(folder, rows held out, train rows kept)``."""
    from microtune.core.jsonl import write_jsonl
    from microtune.synthesis.plan import split_holdout

    labelled = TASKS[recipe.task.type].has_labels
    train = [{**row, "stratum": row["label"] if labelled else ""} for row in read_split(dataset_dir, "train")]
    held, kept = split_holdout(train, recipe.tune.holdout, 13 if recipe.tune.seed is None else recipe.tune.seed)
    plain = [[{k: v for k, v in row.items() if k != "stratum"} for row in rows] for rows in (held, kept)]
    write_jsonl(out / "train.jsonl", plain[1])
    write_jsonl(out / "valid.jsonl", read_split(dataset_dir, "valid") + plain[0])
    return out, len(held), len(kept)


def _extra_train(recipe: Recipe, ws: Workspace, checked: Any) -> list[dict[str, Any]]:
    """Synthetic rows mixed into train (as `train` mixes them) so that trials train on what a real run trains on."""
    if recipe.synth is None or not recipe.synth.mix.enabled:
        return []
    n_real = checked.manifest["stats"]["rows"]["train"]
    rows, _ = synthetic_for_training(recipe, ws.stage_dir(recipe.name, "synthetic"), checked.manifest["dataset_hash"], n_real)
    return rows


# -- the search space ------------------------------------------------------------------------------------------


def default_space(recipe: Recipe, kind: str) -> dict[str, ParamRange]:
    """The settings that matter for a method kind, around the recipe's own values: lr (a range by kind: lower for full
    fine-tuning, higher for prompt learning), epochs or max_steps, batch size, the method's size and dropout, and class
    balancing for labelled tasks. Method fields are looked up by name, so a plugin method with `r` gets LoRA's ranges."""
    cfg, fields = recipe.train, methods.configs()[kind].model_fields
    lr = (1e-6, 1e-4) if methods.has(kind, "full_model") else (1e-3, 0.3) if methods.has(kind, "prompt_learning") else \
        (1e-4, 5e-3) if "r" in fields else (1e-4, 5e-2)
    space = {"train.lr": ParamRange(low=lr[0], high=lr[1], log=True),
             "train.batch_size": ParamRange(choices=sorted({max(1, cfg.batch_size // 2), cfg.batch_size, cfg.batch_size * 2}))}
    if cfg.max_steps:
        space["train.max_steps"] = ParamRange(low=max(1, cfg.max_steps // 2), high=cfg.max_steps * 2)
    else:
        space["train.epochs"] = ParamRange(low=1, high=max(2, math.ceil(cfg.epochs) + 2))
    if "r" in fields:
        space |= {"method.r": ParamRange(choices=[4, 8, 16, 32]), "method.alpha": ParamRange(choices=[8, 16, 32, 64])}
    if "dropout" in fields:
        space["method.dropout"] = ParamRange(low=0.0, high=0.2)
    if "num_virtual_tokens" in fields:
        space["method.num_virtual_tokens"] = ParamRange(choices=[8, 16, 32])
    if TASKS[recipe.task.type].has_labels:
        space |= {"train.balance": ParamRange(choices=["none", "sample", "weight"]), "train.balance_power": ParamRange(low=0.25, high=1.0)}
    return space


def search_space(recipe: Recipe, kind: str) -> dict[str, ParamRange]:
    """The space of one method kind: its defaults (``tune.defaults``) with the recipe's ``tune.space`` laid over them
    (``null`` drops a path), less the method fields this kind does not have."""
    space = default_space(recipe, kind) if recipe.tune.defaults else {}
    for path, spec in recipe.tune.space.items():
        if spec is None:
            space.pop(path, None)
        else:
            space[path] = spec
    fields = methods.configs()[kind].model_fields
    return {p: s for p, s in space.items() if not p.startswith("method.") or p.partition(".")[2] in fields}


def suggest(trial: Any, recipe: Recipe) -> list[str]:
    """Draw the trial's settings (the method kind first when ``tune.methods`` is given) as ``a.b=value`` overrides.
    ``train.balance_power`` is drawn only where balancing is on: with balance `none` it would change nothing."""
    overrides, kind = [], recipe.method.kind
    if recipe.tune.methods:
        kind = trial.suggest_categorical("method.kind", list(recipe.tune.methods))
        if kind != recipe.method.kind:
            overrides.append(f"method={_yaml({'kind': kind})}")  # a new section: the old kind's fields do not apply
    space = search_space(recipe, kind)
    for path in sorted(space, key=lambda p: p != "train.balance"):  # balance first: balance_power depends on it
        if path == "train.balance_power" and trial.params.get("train.balance", recipe.train.balance) == "none":
            continue
        overrides.append(f"{path}={_yaml(_draw(trial, path, space[path], kind))}")
    return overrides


def _draw(trial: Any, path: str, spec: ParamRange, kind: str) -> Any:
    """One value: a choice, or a number drawn as the field's type (integers for `r`, `batch_size`, `max_steps`, …)."""
    if spec.choices is not None:
        return trial.suggest_categorical(path, list(spec.choices))
    if _integral(path, kind):
        return trial.suggest_int(path, math.ceil(spec.low), math.floor(spec.high), log=spec.log)
    return trial.suggest_float(path, float(spec.low), float(spec.high), log=spec.log)


def _integral(path: str, kind: str) -> bool:
    section, _, name = path.partition(".")
    model = TrainConfig if section == "train" else methods.configs()[kind]
    annotation = model.model_fields[name].annotation
    types = set(get_args(annotation)) or {annotation}
    return int in types and float not in types


def _yaml(value: Any) -> str:
    """A value as the YAML `apply_override` parses back to the same value (floats keep their dot: 1.0e-05, not 1e-05)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


# -- outputs ---------------------------------------------------------------------------------------------------


def _summarise(job: _Job, study: Any, source: Path | None, user_overrides: list[str], folder: Path) -> TuneResult:
    """trials.csv, importances, the history plot, summary.json, the tuned recipe; all logged to the study's MLflow run."""
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): n for s in TrialState if (n := sum(t.state == s for t in trials))}
    _write_csv(folder / "trials.csv", trials, job.direction)
    importances, why = _importances(study)
    _plot(folder / "history.png", trials, job)
    best = _best(study)
    result = TuneResult(job.study, job.storage, folder, None, job.metric, None if best is None else best.value, counts=counts,
                        importances=importances)
    if best is not None:
        result.best_params, result.overrides = dict(best.params), list(best.user_attrs.get("overrides", []))
        result.tuned_recipe = _write_tuned(job, source, user_overrides, result, best.number, folder)
    write_json(folder / "summary.json", {"study": job.study, "storage": job.storage, "metric": job.metric, "direction": job.direction,
                                         "split": "valid", "holdout": job.recipe.tune.holdout,
                                         "selection_rows": len(read_split(job.dataset_dir, "valid")),
                                         "best_trial": None if best is None else best.number,
                                         "best_value": result.best_value, "best_params": result.best_params,
                                         "overrides": result.overrides, "importances": importances, "importances_note": why,
                                         "counts": counts, "tuned_recipe": str(result.tuned_recipe) if result.tuned_recipe else None})
    with tracked_run(job.recipe, Workspace(job.workspace), run_id=study.user_attrs[PARENT_RUN], job_type="tune") as run:
        if result.best_value is not None:
            run.log_metrics({f"best.valid.{job.metric}": result.best_value, "trials.complete": counts.get("complete", 0)})
        log_folder(folder, "tune")
    return result


def _write_csv(path: Path, trials: list[Any], direction: str) -> None:
    """One row per trial: ``stopped`` says what ended a pruned trial (``pruner`` or ``budget``); ``value`` is the valid
    score of a completed trial only; ``valid_loss`` the last validation loss reported (a pruned trial's reason), at
    ``last_step``."""
    from optuna.trial import TrialState

    params, sign = sorted({p for t in trials for p in t.params}), 1.0 if direction == "minimize" else -1.0
    with open(path, "w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["number", "state", "stopped", "value", "valid_loss", "last_step", "seconds", "from_recipe", *params])
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
            step = t.last_step
            loss = sign * t.intermediate_values[step] if step is not None else ""
            value = t.value if t.state == TrialState.COMPLETE else ""
            out.writerow([t.number, t.state.name, t.user_attrs.get(STOPPED, ""), value, loss, "" if step is None else step,
                          seconds, "yes" if t.user_attrs.get(FROM_RECIPE) else "", *(t.params.get(p, "") for p in params)])


def _importances(study: Any) -> tuple[dict[str, float], str]:
    """Optuna's parameter importances (fANOVA) once two trials completed; otherwise empty, with the reason."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 completed trials, the study has {len(done)}"
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}, ""
    except (ValueError, RuntimeError) as exc:  # e.g. every completed trial drew the same values
        return {}, f"not computable: {exc}"


def _plot(path: Path, trials: list[Any], job: _Job) -> None:
    """The optimisation history: each trial's valid score (pruned trials at their last reported value) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
    if done:
        pick = min if job.direction == "minimize" else max
        best = [pick(v for n, v in done if n <= number) for number, _ in done]
        ax.scatter(*zip(*done), label=f"trial (valid {job.metric})", color="tab:blue")
        ax.step([n for n, _ in done], best, where="post", label="best so far", color="tab:red")
    pruned = [t.number for t in trials if t.state == TrialState.PRUNED]
    for number in pruned:
        ax.axvline(number, color="0.85", linewidth=1)
    ax.set_xlabel("trial" + (" (grey: pruned)" if pruned else ""))
    ax.set_ylabel(f"valid {job.metric}")
    ax.set_title(f"study {job.study}: optimisation history")
    if done:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_tuned(job: _Job, source: Path | None, user_overrides: list[str], result: TuneResult, number: int, folder: Path) -> Path:
    """``<name>.tuned.yaml`` next to the original YAML (the original untouched): its own keys plus the ``--set`` overrides
    and the best trial's, under a comment header naming the study and the valid score. A Recipe object (no file) gets
    its resolved form, in the tune folder."""
    if source is not None:
        raw, dest = yaml.safe_load(source.read_text(encoding="utf-8")) or {}, source.with_name(f"{source.stem}.tuned.yaml")
    else:
        raw, dest = job.recipe.resolved(), folder / f"{job.recipe.name}.tuned.yaml"
    for item in [*user_overrides, *result.overrides]:
        apply_override(raw, item)
    header = (f"# Tuned by `microtune tune`: study {job.study!r} in {job.storage}, best of {sum(result.counts.values())} trial(s): "
              f"trial {number}, valid {job.metric} {result.best_value:.4f}.\n"
              f"# The original: {source.name if source else job.recipe.name}; changed here: {', '.join(result.overrides) or 'nothing'}.\n")
    write_text(dest, header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=150))
    try:
        if source is not None:
            load_recipe(dest)  # relative data paths resolve as the original's do: it is in the same folder
    except MicrotuneError as exc:
        raise RecipeError(f"the tuned recipe {dest} does not validate: {exc.message}", problems=exc.problems,
                          hint="narrow tune.space to values the recipe accepts, then rerun (the study is kept)") from None
    return dest
