"""The evaluate step: the micro-model against prompted baselines and endpoints, logged to the adapter's MLflow run.

    eval_dir = evaluate("recipes/banking-intents.yaml")            # the newest adapter of the recipe
    report(eval_dir)                                               # re-render report.html from the files alone
"""
from __future__ import annotations

from pathlib import Path

from microtune.core.artifacts import read_manifest, write_artifact
from microtune.core.hashing import hash_file
from microtune.core.progress import Reporter
from microtune.core.workspace import Workspace
from microtune.evaluation import evaluate_systems, preflight, render_report
from microtune.models import resolve_base
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.registry import log_folder, require_backends, tracked_run


def evaluate(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
             adapter: str | Path | None = None, reporter: Reporter | None = None, dataset: str | Path | None = None) -> Path:
    """Evaluate an adapter (default: the newest for the recipe) against the prompted baselines and endpoints.

    The eval artifact holds metrics with bootstrap intervals, paired tests vs the micro-model, latency,
    throughput and cost, and report.html; all of them are logged to the adapter's MLflow run (the metrics to its mirrors too).
    ``dataset``: test on another dataset artifact's test split than the adapter's own (the gate scores
    the champion on the challenger's frozen set this way).
    """
    recipe, ws = resolve_recipe(recipe, overrides), Workspace.at(workspace)
    preflight(recipe)
    require_backends(recipe)
    adapter_dir = Path(adapter) if adapter else ws.latest(recipe.name, "adapters")
    manifest = read_manifest(adapter_dir, "adapter")
    dataset_dir = Path(dataset or manifest["dataset_dir"])
    read_manifest(dataset_dir, "dataset")
    test_hash = hash_file(dataset_dir / "test.jsonl")
    dest = ws.stage_dir(recipe.name, "evals") / (adapter_dir.name if dataset is None else f"{adapter_dir.name}-on-{test_hash[:12]}")
    with tracked_run(recipe, ws, run_id=manifest.get("mlflow_run_id"), job_type="eval") as run:
        with write_artifact(dest, "eval", {"recipe": recipe.name, "adapter_dir": str(adapter_dir),
                                           "dataset_dir": str(dataset_dir), "test_hash": test_hash}) as (tmp, m):
            metrics = evaluate_systems(recipe, resolve_base(recipe.model), dataset_dir, adapter_dir,
                                       manifest["labels"], tmp, reporter)
            m.update(metrics=metrics, main_metric=recipe.metric_names()[0], metric_names=recipe.metric_names())
        for system, values in metrics.items():
            run.log_metrics({f"eval.{system}.{k}": v for k, v in values.items() if isinstance(v, (int, float))})
            run.log_metrics({f"eval.{system}.{k}.ci_{end}": bound for k, (low, high) in values.get("ci", {}).items()
                             for end, bound in (("low", low), ("high", high))})
        log_folder(dest, "eval")  # predictions, metrics, stats.json, report.html and its PNGs
    return dest


def report(eval_dir: str | Path) -> Path:
    """Re-render report.html and its PNGs from an eval artifact's files (no model, no recipe needed)."""
    read_manifest(Path(eval_dir), "eval")
    return render_report(eval_dir)
