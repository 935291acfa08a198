"""Eval of generated answers: every local system's extract answer is a valid object by construction (a random model
answers garbage, so without the JSON constraint these rates are 0), watch's score_examples decodes the same way,
and generate stays unconstrained."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microtune.evaluation.runner import _predictor
from microtune.tasks import ExtractConfig, GenerateConfig, get_task
from microtune.tasks.render import Renderer
from toydata import write_jsonl

FIELDS = {"drug": "the drug", "effect": "the adverse effect", "dosage": "the dose"}


@pytest.fixture(scope="module")
def extract_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """check → train (2 steps: the model stays random) → eval of an extract recipe on the tiny model."""
    import yaml

    from microtune import pipeline

    folder = tmp_path_factory.mktemp("extract")
    drugs, effects = ["aspirin", "insulin", "warfarin", "heparin"], ["rash", "bleeding", "nausea", "fever"]
    rows = [{"text": f"Patient on {d} developed {e} on day {i}.", "target": {"drug": d, "effect": e}}
            for i, (d, e) in enumerate((d, e) for d in drugs for e in effects)]
    write_jsonl(folder / "train.jsonl", rows[:12])
    write_jsonl(folder / "test.jsonl", rows[12:])
    recipe = {"name": "ade", "model": {"base": str(tiny_model_dir)},
              "task": {"type": "extract", "instruction": "Extract the drug event.", "fields": FIELDS, "max_new_tokens": 40},
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}},
              "train": {"max_steps": 2, "batch_size": 4, "max_seq_len": 128, "log_every": 1}, "eval": {"shots": 2, "batch_size": 4}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "recipe.yaml", pipeline.run(folder / "recipe.yaml", workspace=folder / "ws")


@pytest.mark.slow
def test_every_local_system_answers_valid_json(extract_run: Any) -> None:
    _, result = extract_run
    assert set(result.metrics) == {"zero_shot", "few_shot", "micro"}
    assert all(m["valid_rate"] == 1.0 for m in result.metrics.values())
    rows = [json.loads(line) for line in (result.eval_dir / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        for system in ("zero_shot", "few_shot", "micro"):
            assert list(json.loads(row[system]["raw"])) == list(FIELDS)  # the raw answer itself is the object, keys in order


@pytest.mark.slow
def test_watch_scoring_decodes_the_same_way(extract_run: Any) -> None:
    from microtune.config import load_recipe
    from microtune.evaluation import score_examples
    from microtune.models import resolve_base

    path, result = extract_run
    recipe = load_recipe(path)
    examples = [{"text": "Patient on codeine developed itching.", "output": {"drug": "codeine", "effect": "itching", "dosage": None}},
                {"text": "Heparin 5000 units caused bleeding.", "output": {"drug": "Heparin", "effect": "bleeding", "dosage": "5000 units"}}]
    metrics = score_examples(recipe, resolve_base(recipe.model), result.adapter_dir, examples)
    assert metrics["valid_rate"] == 1.0


def test_json_decoders_are_constrained_and_free_ones_are_not(tiny_model_dir: Path, tokenizer: Any) -> None:
    extract = get_task(ExtractConfig(instruction="x", fields=FIELDS), [])
    generate = get_task(GenerateConfig(instruction="x"), [])
    renderer = Renderer(tokenizer)
    assert _predictor(extract, None, renderer, 4, False).schema == extract.answer_schema()
    assert _predictor(generate, None, renderer, 4, False).schema is None
