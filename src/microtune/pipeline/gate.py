"""The gate applied to a newly registered version: challenger vs champion on one frozen set, then promote or not;
and the hand-operated verbs, ``promote`` and ``rollback``.

    decision = gate("recipes/banking-intents.yaml", version="4")     # after `run` registered version 4
    promote("banking-intents", "3", reason="hotfix")                  # by hand, recorded as manual
    rollback("banking-intents")                                       # champion back to the one it replaced

``gate`` reads top to bottom: the version becomes ``challenger`` → both versions' predictions on the
challenger's test split (the champion is re-evaluated there when its own eval used another test set)
→ paired test and guards (registry/gate.py), among them the margin over the classical baseline on the same set
(classify; from the eval's predictions when it ran that baseline, else fitted here on the train split) → the decision is written to
``<workspace>/<recipe>/decisions/`` and as tags on the version → ``champion`` moves only on
``promote``; ``challenger`` is cleared either way. The first version of a model has nothing to beat
and becomes champion (unless ``gate.beat_classical`` is on and it does not beat the classical baseline).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from microtune.config import Recipe
from microtune.core.artifacts import read_json, read_manifest, write_json
from microtune.core.crashpoints import reach
from microtune.core.jsonl import read_jsonl
from microtune.core.progress import Reporter
from microtune.core.workspace import Workspace
from microtune.data import read_split
from microtune.data.balance import row_weights
from microtune.evaluation import classical as classical_baseline
from microtune.evaluation.stats import mcnemar
from microtune.evaluation.stats import paired_bootstrap_p as p_value
from microtune.pipeline.check import check
from microtune.pipeline.evaluate import evaluate
from microtune.pipeline.lineage import recipe_hash
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.pipeline.versions import registry_at
from microtune.registry import models as registry
from microtune.registry.gate import ClassicalMargin, Evidence, decide
from microtune.registry.models import CHAMPION, Decision, Version
from microtune.registry.tracking import tracking_uri
from microtune.tasks import TASKS, Task, baselines_of, get_task


def gate(recipe: RecipeLike, version: str, workspace: str | Path | None = None, reporter: Reporter | None = None) -> Decision:
    """Decide whether registered ``version`` replaces the champion; the decision is recorded either way."""
    recipe, ws = resolve_recipe(recipe), Workspace.at(workspace)
    client = registry.registry_client(tracking_uri(recipe, ws))
    name, new = recipe.name, registry.get_version(client, recipe.name, version)
    champ = registry.by_alias(client, name, CHAMPION)
    guard = _classical_margin(recipe, new)
    if champ is None or champ.version == new.version:
        decision = decide(name, None, new.version, None, recipe.gate, guard)
    else:
        registry.set_challenger(client, name, new.version)
        decision = decide(name, champ.version, new.version, _evidence(recipe, ws, champ, new, reporter), recipe.gate, guard)
    write_json(ws.stage_dir(name, "decisions") / f"v{new.version}.json", dataclasses.asdict(decision))
    registry.record_decision(client, decision)
    reach("gate.before_promote")
    if decision.verdict == "promote":
        registry.promote(client, name, new.version, decision.reason)
    else:
        registry.clear_challenger(client, name, new.version)
    return decision


def interrupted_promotion(recipe: RecipeLike, workspace: str | Path | None = None) -> tuple[Version, Decision] | None:
    """Finish a promotion a killed process left half done, for a rerun of the same recipe on the same data.

    The gate records its decision on the version before it moves ``champion``; a kill in between leaves a version
    whose verdict is ``promote`` (and whose promotion began: ``promoted_reason``) while the alias still names the
    champion it was compared with. When the recipe and its data are unchanged, the rerun would train the same model
    again and register a duplicate: instead the alias is moved now and that version is returned with its decision.
    Anything else (another recipe, other data, the champion moved since) returns None and the rerun goes ahead."""
    recipe, ws = resolve_recipe(recipe), Workspace.at(workspace)
    client = registry.registry_client(tracking_uri(recipe, ws))
    try:
        versions = registry.list_versions(client, recipe.name)
    except registry.RegistryError:  # nothing registered yet
        return None
    champ = next((v for v in versions if CHAMPION in v.aliases), None)
    cut = [v for v in versions if v.tags.get("gate.verdict") == "promote" and "promoted_reason" in v.tags and CHAMPION not in v.aliases
           and v.tags.get("gate.champion") == (champ.version if champ else "none") and (champ is None or int(v.version) > int(champ.version))
           and v.tags.get("recipe_hash") == recipe_hash(recipe)]
    if not cut or cut[0].tags.get("dataset_hash") != check(recipe, workspace=workspace).manifest["dataset_hash"]:
        return None
    version = registry.promote(client, recipe.name, cut[0].version, cut[0].tags["promoted_reason"])
    decision = Decision(**read_json(ws.stage_dir(recipe.name, "decisions") / f"v{version.version}.json"))
    return version, decision


def promote(name: str, version: str | int, reason: str = "manual promotion", workspace: str | Path | None = None) -> Decision:
    """Make ``version`` the champion by hand (bypassing the gate); the decision is recorded as manual and returned
    (``champion``: the version it replaced, None when there was none)."""
    client = registry_at(workspace)
    before = registry.by_alias(client, name, CHAMPION)
    promoted = registry.promote(client, name, str(version), f"manual: {reason}")
    decision = Decision(name, promoted.version, before.version if before else None, "promote", f"manual: {reason}")
    registry.record_decision(client, decision)
    return decision


def rollback(name: str, workspace: str | Path | None = None) -> Version:
    """Move ``champion`` back to the version the current champion replaced; returns that version."""
    return registry.rollback(registry_at(workspace), name)


def _evidence(recipe: Recipe, ws: Workspace, champ: Version, new: Version, reporter: Reporter | None) -> Evidence:
    new_eval = Path(new.tags["eval_dir"])
    new_manifest = read_manifest(new_eval, "eval")
    champ_eval = Path(champ.tags.get("eval_dir", ""))
    same_set = champ_eval.is_dir() and read_manifest(champ_eval, "eval").get("test_hash") == new_manifest["test_hash"]
    if not same_set:  # score the champion on the challenger's frozen set
        champ_eval = evaluate(recipe.with_overrides(["eval.baselines=[]"]), None, ws.root, adapter=champ.tags["adapter_dir"],
                              reporter=reporter, dataset=new_manifest["dataset_dir"])
    rows_new, rows_champ = _predictions(new_eval), _predictions(champ_eval)
    labels = read_manifest(Path(new_manifest["dataset_dir"]), "dataset")["labels"]
    task = get_task(recipe.task, labels)
    golds = [r["gold"] for r in rows_new]
    a = task.example_scores(golds, [r["micro"]["pred"] for r in rows_champ])
    b = task.example_scores(golds, [r["micro"]["pred"] for r in rows_new])
    if task.has_labels:
        p, test = mcnemar([x == 1.0 for x in a], [x == 1.0 for x in b])["p_value"], "McNemar"
    else:
        p, test = paired_bootstrap_p(a, b, seed=recipe.eval.seed), "paired bootstrap"
    recall = {"champion": _recall(golds, rows_champ), "challenger": _recall(golds, rows_new)} if task.has_labels else {}
    flips = _flips(golds, a, b) if task.has_labels else {}
    return Evidence(recipe.metric_names()[0], read_json(champ_eval / "metrics.json")["micro"],
                    read_json(new_eval / "metrics.json")["micro"], float(p), test, len(golds), recall, flips)


def _classical_margin(recipe: Recipe, new: Version) -> ClassicalMargin | None:
    """The new version's main metric vs the classical baseline's on its frozen set (its eval's test rows), McNemar on
    per-row correctness. None when the task type has no classical baseline or the version's eval folder is gone."""
    eval_dir = Path(new.tags.get("eval_dir", ""))
    if "classical" not in baselines_of(TASKS[recipe.task.type]) or not (eval_dir / "predictions.jsonl").is_file():
        return None
    dataset_dir = Path(read_manifest(eval_dir, "eval")["dataset_dir"])
    task = get_task(recipe.task, read_manifest(dataset_dir, "dataset")["labels"])
    rows = _predictions(eval_dir)
    preds, source = _classical_predictions(recipe, task, rows, dataset_dir)
    golds, micro = [r["gold"] for r in rows], [r["micro"]["pred"] for r in rows]
    m = recipe.metric_names()[0]
    right_micro = [x == 1.0 for x in task.example_scores(golds, micro)]
    right_classical = [x == 1.0 for x in task.example_scores(golds, preds)]
    return ClassicalMargin(m, float(task.metrics(golds, micro)[m]), float(task.metrics(golds, preds)[m]),
                           float(mcnemar(right_micro, right_classical)["p_value"]), len(rows), source)


def _classical_predictions(recipe: Recipe, task: Task, rows: list[dict[str, Any]], dataset_dir: Path) -> tuple[list[Any], str]:
    """The classical baseline's answers on the frozen rows: the eval's own when it ran that baseline (the report's numbers),
    else fitted now on the dataset's train split, balanced as the recipe trains (deterministic, so the same answers the
    eval would have given)."""
    if rows and classical_baseline.NAME in rows[0]:
        return [r[classical_baseline.NAME]["pred"] for r in rows], "the eval's predictions.jsonl"
    train = read_split(dataset_dir, "train")
    model = classical_baseline.fit(task, train, row_weights(train, recipe.train.balance, recipe.train.balance_power))
    return [pred for pred, _ in model.predict(rows)], "fitted by the gate on the dataset's train split"


def _predictions(eval_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(eval_dir / "predictions.jsonl")


def _recall(golds: list[Any], rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for label in sorted(set(golds)):
        idx = [i for i, g in enumerate(golds) if g == label]
        out[label] = sum(rows[i]["micro"]["pred"] == label for i in idx) / len(idx)
    return out


def _flips(golds: list[Any], champ: list[float], chall: list[float]) -> dict[str, tuple[int, int]]:
    """Per gold class: rows the challenger got wrong that the champion got right, and the reverse."""
    out: dict[str, list[int]] = {}
    for g, a, b in zip(golds, champ, chall):
        counts = out.setdefault(g if isinstance(g, str) else "; ".join(sorted(g)), [0, 0])
        counts[0] += a == 1.0 and b != 1.0
        counts[1] += b == 1.0 and a != 1.0
    return {label: (lost, gained) for label, (lost, gained) in out.items()}


def paired_bootstrap_p(a: list[float], b: list[float], n: int = 2000, seed: int = 13) -> float:
    """Paired bootstrap over the frozen set's rows: both versions' mean score on the same resampled rows."""
    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a_), size=(n, len(a_)))
    return p_value(b_[idx].mean(axis=1), a_[idx].mean(axis=1), float(b_.mean() - a_.mean()))
