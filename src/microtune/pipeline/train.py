"""The train step: check, then fine-tune; the adapter artifact is tracked as an MLflow run.

    adapter_dir = train("recipes/banking-intents.yaml", ["train.epochs=1"], reporter=print)

Events from the training engine (stage ``train``: ``start``, ``progress`` per optimizer step, ``metrics``,
``done``) are routed here: ``metrics`` go to the MLflow run and its mirrors (``tracking.backends``), everything else
to the caller's reporter.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import Recipe
from microtune.core.artifacts import read_json, write_artifact
from microtune.core.atomic import write_text
from microtune.core.crashpoints import reach
from microtune.core.errors import ArtifactError
from microtune.core.progress import Reporter
from microtune.core.workspace import Workspace, new_run_id
from microtune.models import resolve_base
from microtune.pipeline.check import CheckResult, check
from microtune.pipeline.lineage import lineage, recipe_hash
from microtune.pipeline.recipes import RecipeLike, recipe_json
from microtune.registry import log_folder, recipe_params, tracked_run
from microtune.synthesis import synthetic_for_training
from microtune.training import distributed as dist
from microtune.training import train_adapter
from microtune.training.checkpoint import latest_checkpoint
from microtune.training.defaults import data_defaults


def train(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
          reporter: Reporter | None = None, resume: bool = False) -> Path:
    """Check, then fine-tune; returns the adapter artifact folder. Tracked as an MLflow run (and its mirrors).

    With ``resume`` the newest unfinished run of this recipe continues from its last checkpoint
    (written every ``train.save_steps``) in the same MLflow run; the recipe must not have changed.
    """
    dist.init()
    if not dist.is_main():
        dist.barrier()  # rank 0 writes the dataset artifact first
    checked = check(recipe, overrides, workspace)
    if dist.is_main():
        dist.barrier()
    recipe, ws = checked.recipe, Workspace.at(workspace)
    extra, synthetic = _synthetic_rows(recipe, ws, checked)
    if extra and checked.chosen:  # `auto` settings count the synthetic rows mixed in too
        recipe = data_defaults(checked.declared or recipe, checked.manifest["stats"], len(extra))[0]
    ref = resolve_base(recipe.model)
    run_hash = recipe_hash(checked.declared or recipe)  # the recipe as written: its `auto` settings follow from it and the data
    run_id, mlflow_id = _pending_run(ws, recipe, run_hash) if resume else (new_run_id(), None)
    dest, ckpt = ws.stage_dir(recipe.name, "adapters") / run_id, ws.stage_dir(recipe.name, "checkpoints") / run_id
    labels = checked.manifest["labels"]
    if not dist.is_main():  # other ranks train their shard; only rank 0 reports, logs and writes
        with tempfile.TemporaryDirectory() as scratch:
            train_adapter(recipe, ref, checked.dataset_dir, labels, Path(scratch), checkpoint_dir=ckpt, resume=resume,
                          extra_train=extra)
        return dest
    params = recipe_params(recipe) if mlflow_id is None else None  # a resumed run has its parameters already
    with tracked_run(recipe, ws, run_id=mlflow_id, run_name=run_id, params=params, job_type="train") as run:
        with write_artifact(dest, "adapter", {"recipe": recipe.name}) as (tmp, manifest):
            out = train_adapter(recipe, ref, checked.dataset_dir, labels, tmp, reporter=run.reporter(reporter), checkpoint_dir=ckpt,
                                resume=resume, run_meta={"mlflow_run_id": run.run_id, "recipe_hash": run_hash},
                                extra_train=extra)
            if synthetic:
                manifest["synthetic"] = synthetic
            out["cost"]["full_finetune"] = _measured_full(ws, recipe, checked.manifest) or out["cost"]["full_finetune"]
            write_text(tmp / "recipe.json", recipe_json(recipe))
            manifest.update(labels=labels, dataset_dir=str(checked.dataset_dir), mlflow_run_id=run.run_id,
                            lineage=lineage(recipe, ref, checked.manifest, tmp) | {"recipe_hash": run_hash}, **out)
        reach("train.after_artifact")
        run.log_metrics({f"cost.{k}": v for k, v in out["cost"].items() if isinstance(v, (int, float))})
        log_folder(dest, "adapter")
    shutil.rmtree(ckpt, ignore_errors=True)  # the run finished: its checkpoints are spent
    return dest


def _synthetic_rows(recipe: Recipe, ws: Workspace, checked: CheckResult) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Synthetic rows `train` adds to the real ones (none unless synth.mix.enabled), and what was used."""
    if recipe.synth is None or not recipe.synth.mix.enabled:
        return [], {}
    n_real = checked.manifest["stats"]["rows"]["train"]
    return synthetic_for_training(recipe, ws.stage_dir(recipe.name, "synthetic"), checked.manifest["dataset_hash"], n_real)


def _pending_run(ws: Workspace, recipe: Recipe, recipe_hash: str) -> tuple[str, str]:
    """The newest run with a checkpoint and no finished adapter: ``(run_id, mlflow_run_id)``."""
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
        if methods.has(m.get("method"), "full_model") and m.get("lineage", {}).get("dataset_hash") == dataset["dataset_hash"]:
            c = m["cost"]
            return {"source": "measured", "adapter": str(manifest_path.parent), "train_flops": c["train_flops"],
                    "tokens_seen": c["tokens_seen"], "wall_time_s": c["wall_time_s"], "peak_memory_mb": c["peak_memory_mb"],
                    "trainable_params": c["trainable_params"], "gpu_estimates": c["gpu_estimates"]}
    return None
