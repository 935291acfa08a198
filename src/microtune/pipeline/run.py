"""The whole pipeline in one call: check → train → evaluate → register → gate.

    result = run("recipes/banking-intents.yaml", overrides=["train.epochs=1"])
    result.metrics["micro"]["accuracy"], result.model_version, result.decision.verdict
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.artifacts import read_json, read_manifest
from microtune.core.crashpoints import reach
from microtune.core.progress import Reporter
from microtune.pipeline.evaluate import evaluate
from microtune.pipeline.gate import gate, interrupted_promotion
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.pipeline.register import register
from microtune.pipeline.train import train
from microtune.registry.models import Decision


@dataclass
class RunResult:
    recipe: Recipe
    dataset_dir: Path
    adapter_dir: Path
    eval_dir: Path
    metrics: dict[str, Any]
    model_version: str | None
    decision: Decision | None = None  # the gate's decision on the new version (None when nothing was registered)


def run(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
        reporter: Reporter | None = None, tags: dict[str, str] | None = None) -> RunResult:
    """check → train → evaluate → register → gate, one call; ``tags`` go on the registered version."""
    recipe = resolve_recipe(recipe, overrides)
    if recipe.tracking.register_model and (finished := interrupted_promotion(recipe, workspace)) is not None:
        version, decision = finished  # a killed rerun of this same run: its version is finished, not trained again
        adapter_dir, eval_dir = Path(version.tags["adapter_dir"]), Path(version.tags["eval_dir"])
        dataset_dir = Path(read_manifest(adapter_dir, "adapter")["dataset_dir"])
        return RunResult(recipe, dataset_dir, adapter_dir, eval_dir, read_json(eval_dir / "metrics.json"), version.version, decision)
    adapter_dir = train(recipe, None, workspace, reporter)
    eval_dir = evaluate(recipe, None, workspace, adapter_dir, reporter)
    reach("run.before_register")
    version = register(recipe, adapter_dir, eval_dir, workspace, tags) if recipe.tracking.register_model else None
    decision = gate(recipe, version, workspace, reporter) if version is not None else None
    dataset_dir = Path(read_manifest(adapter_dir, "adapter")["dataset_dir"])
    return RunResult(recipe, dataset_dir, adapter_dir, eval_dir, read_json(eval_dir / "metrics.json"), version, decision)
