"""`train` mixes accepted synthetic rows into the real train split: capped ratio, real rows kept, gate enforced."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fake_teacher import FakeTeacher, examples, label_of, synth_recipe_factory
from microtune.config import load_recipe
from microtune.core.errors import ArtifactError
from microtune.pipeline import synth, train
from microtune.synthesis import synthetic_for_training
from toydata import LABELS

pytestmark = pytest.mark.slow  # every test synthesises a set, most also train on it


@pytest.fixture
def synth_recipe(make_recipe, tiny_model_dir: Path, tmp_path: Path):
    return synth_recipe_factory(make_recipe, tiny_model_dir, tmp_path)


def chatty(body: dict[str, Any], _attempt: int):
    """A teacher with a tell: every row opens and closes with the same pleasantries (separable from real rows)."""
    label, seed = label_of(body), body["seed"]
    return 200, {}, examples(label, [f"Dear support team, question {seed % 97} {k} about my {label}. Thank you kindly for your "
                                     "prompt assistance!" for k in ("one", "two")])


def test_train_adds_synthetic_rows_up_to_the_ratio_and_keeps_every_real_row(synth_recipe, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with FakeTeacher() as teacher:
        recipe = synth_recipe(teacher.url)
        folder = synth(recipe, workspace=ws)
    assert json.loads((folder / "manifest.json").read_text())["accepted"] == 12
    adapter = train(recipe, ["synth.mix.enabled=true", "synth.mix.max_ratio=0.5", "train.epochs=1"], ws)
    m = json.loads((adapter / "manifest.json").read_text())
    assert m["synthetic"] == {**m["synthetic"], "artifact": str(folder), "available": 12, "used": 9, "real": 18}
    assert m["final"]["planned_steps"] == math.ceil((18 + 9) / 4)  # 18 real + 9 synthetic rows, batch 4, one epoch
    rows, _ = synthetic_for_training(load_recipe(recipe, ["synth.mix.enabled=true", "synth.mix.max_ratio=0.5"]),
                                     ws / "toy" / "synthetic", m["lineage"]["dataset_hash"], 18)
    assert sorted(r["label"] for r in rows) == sorted(LABELS * 3)  # the pick keeps each label's share
    plain = train(recipe, ["train.epochs=1"], ws)
    assert "synthetic" not in json.loads((plain / "manifest.json").read_text())  # off unless the recipe says so


def test_a_set_that_failed_the_fidelity_gate_is_refused_unless_allowed(synth_recipe, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with FakeTeacher(chatty) as teacher:
        recipe = synth_recipe(teacher.url, fidelity={"max_auc": 0.8}, filters={"near_dup_threshold": 1.0, "label_check": False})
        folder = synth(recipe, workspace=ws)
    fid = json.loads((folder / "manifest.json").read_text())["fidelity"]
    assert not fid["passed"] and fid["auc"] > 0.8
    with pytest.raises(ArtifactError, match="failed the fidelity gate") as err:
        train(recipe, ["synth.mix.enabled=true"], ws)
    assert "allow_failed_gate" in (err.value.hint or "")
    dataset_hash = json.loads((folder / "manifest.json").read_text())["dataset_hash"]
    allowed = load_recipe(recipe, ["synth.mix.enabled=true", "synth.mix.allow_failed_gate=true"])
    rows, info = synthetic_for_training(allowed, ws / "toy" / "synthetic", dataset_hash, 18)
    assert len(rows) == 12 and info["fidelity_auc"] == fid["auc"]


def test_synthetic_rows_of_other_data_are_not_mixed(synth_recipe, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with FakeTeacher() as teacher:
        recipe = synth_recipe(teacher.url)
        synth(recipe, workspace=ws)
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "my invoice came in the wrong currency", "label": "billing"}) + "\n")
    with pytest.raises(ArtifactError, match="no synthetic artifact for this dataset"):
        train(recipe, ["synth.mix.enabled=true"], ws)


def test_a_set_too_small_for_the_fidelity_test_is_refused_with_the_reason(synth_recipe, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with FakeTeacher(lambda _body, _attempt: (200, {}, '{"examples": [{"text": "unfinished')) as teacher:  # a weak teacher's JSON
        folder = synth(synth_recipe(teacher.url), workspace=ws)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["accepted"] == 0 and manifest["fidelity"]["auc"] is None and not manifest["fidelity"]["passed"]
    with pytest.raises(ArtifactError, match="has 0 accepted rows: too few for the fidelity test") as err:
        train(synth_recipe(teacher.url), ["synth.mix.enabled=true"], ws)
    assert "rejected.jsonl" in (err.value.hint or "")
