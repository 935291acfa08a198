"""Pick the synthetic rows `train` adds to the real train split (real rows are never dropped).

    rows, info = synthetic_for_training(recipe, synthetic_root, dataset_hash, n_real)

The artifact is ``synth.mix.artifact`` or the newest one made from the same dataset. At most
``synth.mix.max_ratio`` synthetic rows per real row are taken, a seeded pick that keeps each label's
(stratum's) share of the accepted rows. The rows are the task's examples as the dataset's splits hold them
(``{"text", "label"}``, ``{"text", "output"}``, ``{"text", "target", "references"}``) with their ``source``.
A set that failed the fidelity gate is refused unless the recipe allows it.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.artifacts import read_manifest
from microtune.core.errors import ArtifactError
from microtune.core.jsonl import read_jsonl
from microtune.synthesis.plan import stratum_of

_SYNTH_ONLY = ("provenance", "scores", "stratum")  # what an accepted row carries beyond the task's example and its source


def find_artifact(recipe: Recipe, root: Path, dataset_hash: str) -> Path:
    mix = recipe.synth.mix if recipe.synth else None
    if mix is not None and mix.artifact is not None:
        return mix.artifact
    found = [p for p in sorted(root.glob("*"), reverse=True)
             if (p / "manifest.json").is_file() and read_manifest(p, "synthetic").get("dataset_hash") == dataset_hash]
    if not found:
        raise ArtifactError(f"synth.mix.enabled is true but there is no synthetic artifact for this dataset in {root}",
                            hint="run `microtune synth RECIPE` first (with the same data), or set synth.mix.enabled=false")
    return found[0]


def synthetic_for_training(recipe: Recipe, root: Path, dataset_hash: str, n_real: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(rows, info)``: rows as the task's examples with their ``source``; empty when the recipe does not mix."""
    if recipe.synth is None or not recipe.synth.mix.enabled:
        return [], {}
    mix, folder = recipe.synth.mix, find_artifact(recipe, root, dataset_hash)
    manifest = read_manifest(folder, "synthetic")
    if manifest.get("dataset_hash") != dataset_hash:
        raise ArtifactError(f"synthetic artifact {folder} was made from another dataset ({str(manifest.get('dataset_hash'))[:12]}, "
                            f"this recipe's is {dataset_hash[:12]})", hint="run `microtune synth RECIPE` again on the current data")
    fid = manifest["fidelity"]
    if not fid["passed"] and not mix.allow_failed_gate and fid["auc"] is None:
        raise ArtifactError(f"synthetic artifact {folder} has {manifest.get('accepted', 0)} accepted rows: too few for the fidelity "
                            "test, so nothing is mixed in", hint="look at its rejected.jsonl (every reject has a reason code); "
                            "a stronger teacher (synth.teacher.base_url) or a larger synth.per_label gives more rows")
    if not fid["passed"] and not mix.allow_failed_gate:
        raise ArtifactError(f"synthetic artifact {folder} failed the fidelity gate: real-vs-synthetic AUC {fid['auc']:.3f} > "
                            f"{fid['max_auc']}", hint="look at its fidelity.html; regenerate (more exemplars, attributes), raise "
                            "synth.fidelity.drop_most_synthetic, or set synth.mix.allow_failed_gate=true to mix it anyway")
    rows = read_jsonl(folder / "accepted.jsonl")
    picked = _stratified(rows, math.floor(n_real * mix.max_ratio), recipe.train.seed)
    info = {"artifact": str(folder), "available": len(rows), "used": len(picked), "real": n_real, "max_ratio": mix.max_ratio,
            "fidelity_auc": fid["auc"]}
    return [{k: v for k, v in r.items() if k not in _SYNTH_ONLY} for r in picked], info


def _stratified(rows: list[dict[str, Any]], limit: int, seed: int) -> list[dict[str, Any]]:
    if len(rows) <= limit:
        return rows
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_label[stratum_of(row)].append(row)
    exact = {label: limit * len(group) / len(rows) for label, group in by_label.items()}
    take = {label: math.floor(v) for label, v in exact.items()}
    for label in sorted(exact, key=lambda k: exact[k] - take[k], reverse=True)[: limit - sum(take.values())]:
        take[label] += 1
    return [row for label in sorted(by_label) for row in rng.sample(by_label[label], take[label])]
