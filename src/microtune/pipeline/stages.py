"""The stages as plain functions: check → (synth) → train → evaluate → register, and ``run`` that chains them.

    from microtune import check, train, evaluate, run
    result = run("recipes/banking-intents.yaml", overrides=["train.epochs=1"])

Each stage reads the previous stage's artifact from the workspace and writes its own atomically; the
CLI is a thin shell over these functions.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune import __version__
from microtune.config import Recipe, load_recipe
from microtune.core.artifacts import read_json, read_manifest, write_artifact
from microtune.core.hashing import hash_file, hash_text, hash_value
from microtune.core.workspace import Workspace, new_run_id

RecipeLike = str | Path | Recipe


@dataclass
class CheckResult:
    recipe: Recipe
    dataset_dir: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    recipe: Recipe
    dataset_dir: Path
    adapter_dir: Path
    eval_dir: Path
    metrics: dict[str, Any]
    model_version: str | None
    decision: Any = None  # the gate's Decision for the new version (None when nothing was registered)


def _recipe(recipe: RecipeLike, overrides: list[str] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        from microtune.config import apply_override, validate_recipe

        raw = recipe.resolved()
        for item in overrides or []:
            apply_override(raw, item)
        return validate_recipe(raw) if overrides else recipe
    return load_recipe(recipe, overrides)


def check(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None) -> CheckResult:
    """Validate recipe and data; write the content-addressed dataset artifact (reused when unchanged)."""
    from microtune.data import build_dataset, compute_stats, write_dataset
    from microtune.models import load_tokenizer, resolve_base
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe, ws = _recipe(recipe, overrides), Workspace.at(workspace)
    result = build_dataset(recipe)
    ref = resolve_base(recipe.model)
    renderer, task = Renderer(load_tokenizer(ref)), get_task(recipe.task, result.labels)
    max_len = recipe.train.max_seq_len
    stats = compute_stats(result.splits, result.labels, lambda ex: renderer.encode(task.messages(ex), task.target(ex), max_len))
    dest = ws.stage_dir(recipe.name, "datasets") / result.key[:12]
    manifest = {"recipe": recipe.name, "dataset_hash": result.key, "labels": result.labels, "sources": result.sources,
                "stats": stats, "warnings": [str(p) for p in result.log.warnings], "task": recipe.task.model_dump(mode="json")}
    if not (dest / "manifest.json").is_file():
        with write_artifact(dest, "dataset", manifest) as (tmp, _):
            write_dataset(result, tmp)
    return CheckResult(recipe, dest, read_manifest(dest, "dataset"), manifest["warnings"])


def _lineage(recipe: Recipe, ref: Any, dataset: dict[str, Any], adapter_dir: Path) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    template = (adapter_dir / "chat_template.jinja")
    return {
        **ref.lineage(),
        "dataset_hash": dataset["dataset_hash"],
        "recipe_hash": hash_value(recipe.resolved()),
        "chat_template_hash": hash_text(template.read_text()) if template.is_file() else None,
        "microtune_version": __version__,
        "git_commit": _git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "seed": recipe.train.seed,
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def train(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
          progress: str | bool | None = "bar", resume: bool = False) -> Path:
    """Check, then fine-tune; returns the adapter artifact folder. Tracked as an MLflow run.

    With ``resume`` the newest unfinished run of this recipe continues from its last checkpoint
    (written every ``train.save_steps``) in the same MLflow run; the recipe must not have changed.
    """
    from microtune.core.progress import only
    from microtune.models import resolve_base
    from microtune.registry import log_folder, log_metrics, log_params, mlflow_run
    from microtune.training import distributed as dist
    from microtune.training import train_adapter

    dist.init()
    if not dist.is_main():
        dist.barrier()  # rank 0 writes the dataset artifact first
    checked = check(recipe, overrides, workspace)
    if dist.is_main():
        dist.barrier()
    recipe, ws = checked.recipe, Workspace.at(workspace)
    ref = resolve_base(recipe.model)
    recipe_hash = hash_value(recipe.resolved())
    run_id, mlflow_id = _pending_run(ws, recipe, recipe_hash) if resume else (new_run_id(), None)
    dest, ckpt = ws.stage_dir(recipe.name, "adapters") / run_id, ws.stage_dir(recipe.name, "checkpoints") / run_id
    extra, synthetic = _synthetic_rows(recipe, ws, checked)
    if not dist.is_main():  # other ranks train their shard; only rank 0 logs and writes
        with tempfile.TemporaryDirectory() as scratch:
            train_adapter(recipe, ref, checked.dataset_dir, checked.manifest["labels"], Path(scratch), checkpoint_dir=ckpt,
                          resume=resume, extra_train=extra)
        return dest
    with mlflow_run(recipe, ws, run_id=mlflow_id, run_name=run_id) as run:
        if mlflow_id is None:
            log_params(recipe)
        with write_artifact(dest, "adapter", {"recipe": recipe.name}) as (tmp, manifest):
            out = train_adapter(recipe, ref, checked.dataset_dir, checked.manifest["labels"], tmp,
                                reporter=only(["metrics"], lambda event: log_metrics(event.data, event.step)), checkpoint_dir=ckpt,
                                resume=resume, run_meta={"mlflow_run_id": run.info.run_id, "recipe_hash": recipe_hash},
                                extra_train=extra)
            if synthetic:
                manifest["synthetic"] = synthetic
            out["cost"]["full_finetune"] = _measured_full(ws, recipe, checked.manifest) or out["cost"]["full_finetune"]
            (tmp / "recipe.json").write_text(_json(recipe.resolved()))
            manifest.update(labels=checked.manifest["labels"], dataset_dir=str(checked.dataset_dir),
                            mlflow_run_id=run.info.run_id, lineage=_lineage(recipe, ref, checked.manifest, tmp), **out)
        log_metrics({f"cost.{k}": v for k, v in out["cost"].items() if isinstance(v, (int, float))})
        log_folder(dest, "adapter")
    shutil.rmtree(ckpt, ignore_errors=True)  # the run finished: its checkpoints are spent
    return dest


def _synthetic_rows(recipe: Recipe, ws: Workspace, checked: CheckResult) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Synthetic rows `train` adds to the real ones (none unless synth.mix.enabled), and what was used."""
    if recipe.synth is None or not recipe.synth.mix.enabled:
        return [], {}
    from microtune.synthesis import synthetic_for_training

    n_real = checked.manifest["stats"]["rows"]["train"]
    return synthetic_for_training(recipe, ws.stage_dir(recipe.name, "synthetic"), checked.manifest["dataset_hash"], n_real)


def synth(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
          on_progress: Any = None) -> Path:
    """Check, then generate, filter and test synthetic rows; returns the ``synthetic/`` artifact folder."""
    from microtune.registry import log_folder, log_metrics, log_params, mlflow_run
    from microtune.synthesis import generate, synth_config, teacher_endpoint

    recipe = _recipe(recipe, overrides)
    if synth_config(recipe).teacher.base_url == "local":  # the offline default: the base model behind microtune serve
        from microtune.pipeline.local_teacher import local_teacher, tuned_teacher

        tuned = synth_config(recipe).teacher.tune_steps is not None
        base = str(tuned_teacher(recipe, workspace, "lines" if on_progress else None)) if tuned else None
        one = ["synth.examples_per_request=1"] if tuned else []  # the tuned teacher learned one example per answer
        with local_teacher(recipe, base=base) as (url, model):
            return synth(recipe, [f"synth.teacher.base_url={url}", f"synth.teacher.model={model}", *one], workspace, on_progress)
    teacher_endpoint(synth_config(recipe).teacher)  # a missing section or an unset key fails before any work
    checked = check(recipe, None, workspace)
    ws, run_id = Workspace.at(workspace), new_run_id()
    dest = ws.stage_dir(recipe.name, "synthetic") / run_id
    meta = {"recipe": recipe.name, "dataset_dir": str(checked.dataset_dir), "dataset_hash": checked.manifest["dataset_hash"],
            "labels": checked.manifest["labels"], "recipe_hash": hash_value(recipe.resolved())}
    with mlflow_run(recipe, ws, run_name=f"synth-{run_id}") as run:
        log_params(recipe)  # the recipe names the key's environment variable, never the key
        with write_artifact(dest, "synthetic", {**meta, "mlflow_run_id": run.info.run_id}) as (tmp, manifest):
            manifest.update(generate(recipe, checked.dataset_dir, checked.manifest["labels"], tmp, ws.root / "synth-cache.sqlite",
                                     on_progress))
            (tmp / "recipe.json").write_text(_json(recipe.resolved()))
        log_metrics(_synth_metrics(read_manifest(dest, "synthetic")))
        log_folder(dest, "synthetic")
    return dest


def _synth_metrics(m: dict[str, Any]) -> dict[str, float]:
    out = {"synth.accepted": m["accepted"], "synth.rejected": m["rejected"], "synth.fidelity_passed": float(m["fidelity"]["passed"])}
    out |= {f"synth.usage.{k}": v for k, v in m["usage"].items() if isinstance(v, (int, float))}
    out |= {f"synth.pass_rate.{k}": v["pass_rate"] for k, v in m["filters"].items() if v["pass_rate"] is not None}
    if m["fidelity"]["auc"] is not None:
        out["synth.fidelity_auc"] = m["fidelity"]["auc"]
    return out


def _pending_run(ws: Workspace, recipe: Recipe, recipe_hash: str) -> tuple[str, str]:
    """The newest run with a checkpoint and no finished adapter: ``(run_id, mlflow_run_id)``."""
    from microtune.core.errors import ArtifactError
    from microtune.training.checkpoint import latest_checkpoint

    root = ws.stage_dir(recipe.name, "checkpoints")
    for folder in sorted(root.glob("*"), reverse=True) if root.is_dir() else []:
        ckpt = latest_checkpoint(folder)
        if ckpt is None or (ws.stage_dir(recipe.name, "adapters") / folder.name / "manifest.json").is_file():
            continue
        state = read_json(ckpt / "state.json")
        if state.get("recipe_hash") != recipe_hash:
            raise ArtifactError(f"the recipe changed since run {folder.name} was checkpointed; it cannot resume",
                                hint="undo the change (or the --set overrides), or start a new run without --resume")
        return folder.name, state["mlflow_run_id"]
    raise ArtifactError(f"nothing to resume for recipe {recipe.name!r}: no unfinished run with a checkpoint",
                        hint="start a run with train.save_steps set (e.g. --set train.save_steps=50); "
                             "--resume continues it after a crash")


def _measured_full(ws: Workspace, recipe: Recipe, dataset: dict[str, Any]) -> dict[str, Any] | None:
    """The measured cost of an earlier `full` run on the same data, to put beside a PEFT run's."""
    for manifest_path in sorted(ws.stage_dir(recipe.name, "adapters").glob("*/manifest.json"), reverse=True):
        m = read_json(manifest_path)
        if m.get("method") == "full" and m.get("lineage", {}).get("dataset_hash") == dataset["dataset_hash"]:
            c = m["cost"]
            return {"source": "measured", "adapter": str(manifest_path.parent), "train_flops": c["train_flops"],
                    "tokens_seen": c["tokens_seen"], "wall_time_s": c["wall_time_s"], "peak_memory_mb": c["peak_memory_mb"],
                    "trainable_params": c["trainable_params"], "gpu_estimates": c["gpu_estimates"]}
    return None


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, default=str) + "\n"


def evaluate(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
             adapter: str | Path | None = None, on_system: Any = None, dataset: str | Path | None = None) -> Path:
    """Evaluate an adapter (default: the newest for the recipe) against the prompted baselines and endpoints.

    The eval artifact holds metrics with bootstrap intervals, paired tests vs the micro-model, latency,
    throughput and cost, and report.html; all of them are logged to the adapter's MLflow run.
    ``dataset``: test on another dataset artifact's test split than the adapter's own (the gate scores
    the champion on the challenger's frozen set this way).
    """
    from microtune.evaluation import evaluate_systems, preflight
    from microtune.models import resolve_base
    from microtune.registry import log_folder, log_metrics, mlflow_run

    recipe, ws = _recipe(recipe, overrides), Workspace.at(workspace)
    preflight(recipe)
    adapter_dir = Path(adapter) if adapter else ws.latest(recipe.name, "adapters")
    manifest = read_manifest(adapter_dir, "adapter")
    dataset_dir = Path(dataset or manifest["dataset_dir"])
    read_manifest(dataset_dir, "dataset")
    test_hash = hash_file(dataset_dir / "test.jsonl")
    dest = ws.stage_dir(recipe.name, "evals") / (adapter_dir.name if dataset is None else f"{adapter_dir.name}-on-{test_hash[:12]}")
    with mlflow_run(recipe, ws, run_id=manifest.get("mlflow_run_id")):
        with write_artifact(dest, "eval", {"recipe": recipe.name, "adapter_dir": str(adapter_dir),
                                           "dataset_dir": str(dataset_dir), "test_hash": test_hash}) as (tmp, m):
            metrics = evaluate_systems(recipe, resolve_base(recipe.model), dataset_dir, adapter_dir,
                                       manifest["labels"], tmp, on_system)
            m.update(metrics=metrics, main_metric=recipe.metric_names()[0], metric_names=recipe.metric_names())
        for system, values in metrics.items():
            log_metrics({f"eval.{system}.{k}": v for k, v in values.items() if isinstance(v, (int, float))})
            log_metrics({f"eval.{system}.{k}.ci_{end}": bound for k, (low, high) in values.get("ci", {}).items()
                         for end, bound in (("low", low), ("high", high))})
        log_folder(dest, "eval")  # predictions, metrics, stats.json, report.html and its PNGs
    return dest


def report(eval_dir: str | Path) -> Path:
    """Re-render report.html and its PNGs from an eval artifact's files (no model, no recipe needed)."""
    from microtune.evaluation import render_report

    read_manifest(Path(eval_dir), "eval")
    return render_report(eval_dir)


def register(recipe: RecipeLike, adapter_dir: Path, eval_dir: Path, workspace: str | Path | None = None,
             extra_tags: dict[str, str] | None = None) -> str:
    """Register the adapter as a new model version, with lineage and eval metrics as tags."""
    from microtune.evaluation import MICRO
    from microtune.registry import register_adapter

    recipe, ws = _recipe(recipe, None), Workspace.at(workspace)
    adapter = read_manifest(adapter_dir, "adapter")
    metrics = read_manifest(eval_dir, "eval")["metrics"]
    lineage = adapter["lineage"]
    tags = {k: v for k, v in lineage.items() if k != "versions"} | {f"version.{k}": v for k, v in lineage["versions"].items()}
    tags |= {f"metric.{s}.{k}": round(v, 4) for s, vals in metrics.items() for k, v in vals.items()
             if k in recipe.metric_names()}
    tags |= {"main_metric": recipe.metric_names()[0], "micro_system": MICRO, "adapter_dir": str(adapter_dir),
             "eval_dir": str(eval_dir), "task": recipe.task.type, **(extra_tags or {})}
    return register_adapter(recipe, ws, adapter["mlflow_run_id"], tags)


def run(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
        progress: str | bool | None = "bar", on_system: Any = None, tags: dict[str, str] | None = None) -> RunResult:
    """check → train → evaluate → register, one call."""
    recipe = _recipe(recipe, overrides)
    adapter_dir = train(recipe, None, workspace, progress)
    eval_dir = evaluate(recipe, None, workspace, adapter_dir, on_system)
    version = register(recipe, adapter_dir, eval_dir, workspace, tags) if recipe.tracking.register_model else None
    decision = None
    if version is not None:
        from microtune.pipeline.promote import gate

        decision = gate(recipe, version, workspace)
    dataset_dir = Path(read_manifest(adapter_dir, "adapter")["dataset_dir"])
    return RunResult(recipe, dataset_dir, adapter_dir, eval_dir, read_json(eval_dir / "metrics.json"), version, decision)
