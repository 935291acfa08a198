"""One small real workspace for the Studio's tests: a tiny random Llama, a `run` (v1, the champion), a `synth` run with
the fake teacher, and a `watch` cycle with a quarantined row whose retrain round registers v2, which the gate rejects
against v1 (a decision with a failing rule). The fewest real runs that still fill every page. Built once per session.

A test row holds ``<script>``: every page that shows it must show it as text."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fake_teacher import FakeTeacher
from toydata import LABELS, TEXTS, write_jsonl

SCRIPT_ROW = "<script>window.PWNED=1</script> my card was charged twice"
SCRIPT_LINE = "<script>window.PWNED=2</script>"  # an inbox line that is not JSON: watch quarantines it and quotes it


def write_recipe(root: Path, model_dir: Path, teacher_url: str | None = None) -> Path:
    """The toy recipe `toy` (classify, 3 labels) with a watch inbox and, when given, a synth section asking the fake teacher."""
    train = write_jsonl(root / "train.jsonl", [{"text": TEXTS[lb][i], "label": lb} for i in range(6) for lb in LABELS])
    test = write_jsonl(root / "test.jsonl", [{"text": TEXTS[lb][i], "label": lb} for i in (6, 7) for lb in LABELS] +
                       [{"text": SCRIPT_ROW, "label": "billing"}])
    (root / "inbox").mkdir(exist_ok=True)
    recipe: dict[str, Any] = {
        "name": "toy", "task": {"type": "classify", "instruction": "Route the customer message.", "labels": LABELS},
        "data": {"train": train.name, "test": test.name, "split": {"valid": 0.0}}, "model": {"base": str(model_dir)},
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 6, "max_seq_len": 96, "lr": 2e-3, "log_every": 1},
        # the fewest timed rows and resamples that still fill every report section: per-row latency was most of the build
        "eval": {"shots": 1, "batch_size": 8, "latency_examples": 1, "n_resamples": 200},
        "watch": {"inbox": "inbox", "min_new_rows": 4, "new_label_min_rows": 3, "min_rows_for_tests": 100, "holdout": 0.25,
                  "retrain": ["train.max_steps=2"]},
    }
    if teacher_url:
        recipe["synth"] = {"per_label": 2, "examples_per_request": 2, "exemplars": 2,
                           "teacher": {"base_url": teacher_url, "model": "fake-teacher", "concurrency": 4, "max_attempts": 2},
                           "fidelity": {"folds": 2, "max_auc": 1.0}, "filters": {"length_slack": 2.0}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def build_workspace(root: Path, model_dir: Path) -> dict[str, Path]:
    """run, synth, watch (its round: run + gate): every page of the Studio has something real to show. Returns the paths the
    tests read."""
    from microtune import pipeline

    ws = root / "ws"
    recipe = write_recipe(root, model_dir)
    pipeline.run(recipe, workspace=ws)  # v1, the champion; the watch round below trains v2 and the gate rejects it
    with FakeTeacher() as teacher:
        pipeline.synth(write_recipe(root, model_dir, teacher.url), workspace=ws)
    recipe = write_recipe(root, model_dir)
    inbox = root / "inbox"
    (inbox / "bad.jsonl").write_text('{"text": "ok row about my bill", "label": "billing"}\n{"text": "no label"}\n' + SCRIPT_LINE + "\n")
    write_jsonl(inbox / "new.jsonl", [{"text": f"the warranty on item {i} expired early", "label": "warranty"} for i in range(6)])
    pipeline.watch_once(recipe, workspace=ws)
    return {"root": root, "ws": ws, "recipe": recipe}
