"""The register step: the adapter becomes a new version of the registered model named after the recipe."""
from __future__ import annotations

from pathlib import Path

from microtune.core.artifacts import read_manifest
from microtune.core.workspace import Workspace
from microtune.evaluation import MICRO
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.registry import register_adapter


def register(recipe: RecipeLike, adapter_dir: Path, eval_dir: Path, workspace: str | Path | None = None,
             extra_tags: dict[str, str] | None = None) -> str:
    """Register the adapter as a new model version, with lineage and eval metrics as tags; returns the version."""
    recipe, ws = resolve_recipe(recipe), Workspace.at(workspace)
    adapter = read_manifest(Path(adapter_dir), "adapter")
    metrics = read_manifest(Path(eval_dir), "eval")["metrics"]
    lineage = adapter["lineage"]
    tags = {k: v for k, v in lineage.items() if k != "versions"} | {f"version.{k}": v for k, v in lineage["versions"].items()}
    tags |= {f"metric.{s}.{k}": round(v, 4) for s, vals in metrics.items() for k, v in vals.items()
             if k in recipe.metric_names()}
    tags |= {"main_metric": recipe.metric_names()[0], "micro_system": MICRO, "adapter_dir": str(adapter_dir),
             "eval_dir": str(eval_dir), "task": recipe.task.type, **(extra_tags or {})}
    return register_adapter(recipe, ws, adapter["mlflow_run_id"], tags)
