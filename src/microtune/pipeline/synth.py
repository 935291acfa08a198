"""The synth step: check, then a teacher writes rows that a filter cascade and fidelity tests keep honest.

    folder = synth("recipes/banking-intents.yaml", ["synth.teacher.base_url=http://127.0.0.1:8000/v1"])

The ``synthetic/<run>/`` artifact holds accepted and rejected rows and the fidelity report; `train`
mixes it in when ``synth.mix.enabled``. A ``local`` teacher is resolved first (served_teacher): the
rest of the step sees a recipe whose teacher is a running endpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.artifacts import read_manifest, write_artifact
from microtune.core.atomic import write_text
from microtune.core.progress import Reporter
from microtune.core.workspace import Workspace, new_run_id
from microtune.pipeline.check import check
from microtune.pipeline.lineage import recipe_hash
from microtune.pipeline.local_teacher import served_teacher
from microtune.pipeline.recipes import RecipeLike, recipe_json, resolve_recipe
from microtune.registry import log_folder, recipe_params, tracked_run
from microtune.synthesis import generate, synth_config, teacher_endpoint


def synth(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
          reporter: Reporter | None = None) -> Path:
    """Check, then generate, filter and test synthetic rows; returns the ``synthetic/`` artifact folder."""
    recipe = resolve_recipe(recipe, overrides)
    synth_config(recipe)  # a recipe without a synth section fails before a teacher is started or tuned
    with served_teacher(recipe, workspace, reporter) as concrete:
        return _generate(concrete, workspace, reporter)


def _generate(recipe: Recipe, workspace: str | Path | None, reporter: Reporter | None) -> Path:
    """The step proper, with a concrete teacher endpoint."""
    teacher_endpoint(synth_config(recipe).teacher)  # an unset key fails before any work
    checked = check(recipe, None, workspace)
    ws, run_id = Workspace.at(workspace), new_run_id()
    dest = ws.stage_dir(recipe.name, "synthetic") / run_id
    meta = {"recipe": recipe.name, "dataset_dir": str(checked.dataset_dir), "dataset_hash": checked.manifest["dataset_hash"],
            "labels": checked.manifest["labels"], "recipe_hash": recipe_hash(recipe)}
    # the recipe names the key's environment variable, never the key
    with tracked_run(recipe, ws, run_name=f"synth-{run_id}", params=recipe_params(recipe), job_type="synth") as run:
        with write_artifact(dest, "synthetic", {**meta, "mlflow_run_id": run.run_id}) as (tmp, manifest):
            manifest.update(generate(recipe, checked.dataset_dir, checked.manifest["labels"], tmp, ws.root / "synth-cache.sqlite",
                                     reporter))
            write_text(tmp / "recipe.json", recipe_json(recipe))
        run.log_metrics(_synth_metrics(read_manifest(dest, "synthetic")))
        log_folder(dest, "synthetic")
    return dest


def _synth_metrics(m: dict[str, Any]) -> dict[str, float]:
    out = {"synth.accepted": m["accepted"], "synth.rejected": m["rejected"], "synth.fidelity_passed": float(m["fidelity"]["passed"])}
    out |= {f"synth.usage.{k}": v for k, v in m["usage"].items() if isinstance(v, (int, float))}
    out |= {f"synth.pass_rate.{k}": v["pass_rate"] for k, v in m["filters"].items() if v["pass_rate"] is not None}
    if m["fidelity"]["auc"] is not None:
        out["synth.fidelity_auc"] = m["fidelity"]["auc"]
    return out
