"""The check step: validate recipe and data, write the content-addressed dataset artifact.

    result = check("recipes/banking-intents.yaml")      # CheckResult(recipe, dataset_dir, manifest, warnings, ...)
    result.chosen["train.epochs"]                        # an `auto` training setting, chosen from the data, and why

The artifact lives at ``<workspace>/<recipe>/datasets/<hash>/`` and is reused while the data and the
splitting settings are unchanged; every later step starts from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.artifacts import read_manifest, write_artifact
from microtune.core.errors import Problem
from microtune.core.workspace import Workspace
from microtune.data import build_dataset, compute_stats, write_dataset
from microtune.models import load_tokenizer, resolve_base
from microtune.models.export import export_refusals
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.registry import require_backends
from microtune.tasks import get_task
from microtune.tasks.render import Renderer, encode_example
from microtune.training.defaults import Choice, data_defaults

UNCUT = 1 << 30  # no cut: check measures each row's real length


@dataclass
class CheckResult:
    recipe: Recipe
    dataset_dir: Path
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    declared: Recipe | None = None  # the recipe as written: `auto` training settings not yet chosen
    chosen: dict[str, Choice] = field(default_factory=dict)  # the training settings chosen from the data, with the reason
    exports: dict[str, str | None] = field(default_factory=dict)  # per `export` format: None (it will be written) or why not, and the fix


def check(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None) -> CheckResult:
    """Validate recipe and data; write the content-addressed dataset artifact (reused when unchanged)."""
    recipe, ws = resolve_recipe(recipe, overrides), Workspace.at(workspace)
    require_backends(recipe)  # a tracker whose package is missing fails here, before any run starts
    if recipe.watch.inbox is not None:
        recipe.retrain_recipe()  # a watched recipe: its retrain overrides must apply, or watch would fail after a trigger
    result = build_dataset(recipe)
    ref = resolve_base(recipe.model)
    renderer, task = Renderer(load_tokenizer(ref)), get_task(recipe.task, result.labels)
    max_len = recipe.train.max_seq_len
    stats = compute_stats(result.splits, result.labels, lambda ex: encode_example(task, ex, renderer, UNCUT), max_len)
    dest = ws.stage_dir(recipe.name, "datasets") / result.key[:12]
    warnings = [str(p) for p in result.log.warnings] + _long_rows(stats, hasattr(task, "conversation"))
    manifest = {"recipe": recipe.name, "dataset_hash": result.key, "labels": result.labels, "sources": result.sources,
                "stats": stats, "warnings": warnings, "task": recipe.task.model_dump(mode="json")}
    if not (dest / "manifest.json").is_file():
        with write_artifact(dest, "dataset", manifest) as (tmp, _):
            write_dataset(result, tmp)
    resolved, chosen = data_defaults(recipe, stats)
    exports = export_refusals(recipe, result.labels, renderer.tok, ref.path)
    return CheckResult(resolved, dest, read_manifest(dest, "dataset"), manifest["warnings"], recipe, chosen, exports)


def _long_rows(stats: dict[str, Any], turns: bool = False) -> list[str]:
    """A warning when train rows are longer than train.max_seq_len: training cuts them (the stats show their real length);
    ``turns``: rows are conversations, whose earliest exchanges go first."""
    over = stats.get("over_max_seq_len") or {}
    if not over.get("rows"):
        return []
    longest = stats["train_tokens"]["max"]
    cut = "drops their earliest exchanges, then cuts the end of the last user text" if turns else "cuts them at the end of the text"
    return [str(Problem("train", f"{over['rows']} row(s) longer than train.max_seq_len={over['max_seq_len']} tokens (longest "
                                 f"{longest:,}); training {cut} — raise train.max_seq_len or shorten "
                                 "those rows", ", ".join(map(str, over["first"])), severity="warning"))]
