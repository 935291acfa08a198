"""The honest baselines beside the prompted ones: `classical` (TF-IDF + logistic regression, classify) and `lead`
(the first sentence, generate) — their predictions, the recipe's refusal of a baseline that does not fit the task,
their place in every eval file, and the gate's classical guard (a tiny random micro-model against a perfect
classical model on keyword-separable rows)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microtune.evaluation import classical, lead
from microtune.tasks import ClassifyConfig, GenerateConfig, get_task
from toydata import write_jsonl

KEYWORDS = {"billing": "invoice", "shipping": "parcel", "refund": "refund"}
TRAIN_FILL = ["please help with my {}", "a question about the {}", "i need an update on my {}", "something is wrong with my {}",
              "hello, it is about the {}", "tell me more about my {}"]
TEST_FILL = ["the {} again", "where do i see the {}", "one more thing on my {}", "my {} today"]


def _rows(fill: list[str]) -> list[dict[str, str]]:
    """Rows whose label is given away by one keyword: a linear model on word counts solves them perfectly."""
    return [{"text": f.format(word), "label": label} for f in fill for label, word in KEYWORDS.items()]


def test_classical_is_perfect_on_keyword_separable_rows() -> None:
    task = get_task(ClassifyConfig(instruction="Route it.", none_label="refund"), sorted(KEYWORDS))
    test = _rows(TEST_FILL)
    answers = classical.fit(task, _rows(TRAIN_FILL)).predict(test)
    assert task.metrics([r["label"] for r in test], [a for a, _ in answers])["accuracy"] == 1.0
    assert all(1 / 3 < p <= 1 for _, p in answers)  # the probability of the predicted label, above chance on every row


def test_classical_multi_label_is_perfect_on_keyword_separable_label_sets() -> None:
    """Per-label models, then the most probable of the decoder's candidate sets: single labels and pairs alike."""
    task = get_task(ClassifyConfig(instruction="Route it.", multi_label=True), sorted(KEYWORDS))
    pair = [{"text": f.format("invoice and refund"), "label": "billing; refund", "labels": ["billing", "refund"]} for f in TRAIN_FILL]
    train = [{**r, "labels": [r["label"]]} for r in _rows(TRAIN_FILL)] + pair
    test = _rows(TEST_FILL) + [{"text": f.format("invoice and refund"), "label": "billing; refund"} for f in TEST_FILL]
    answers = classical.fit(task, train).predict(test)
    assert task.metrics([r["label"] for r in test], [a for a, _ in answers])["exact_match"] == 1.0
    assert all(a in task.candidates() and 0 < p <= 1 for a, p in answers)


def test_lead_answers_the_first_sentence() -> None:
    task = get_task(GenerateConfig(instruction="Sum it up."))
    rows = [{"text": "  The parcel is late. It was due Monday! Please help?"}, {"text": "no sentence end here"},
            {"text": "Where is it? Nobody knows."}, {"text": "first line\nsecond line."}]
    assert lead.fit(task, []).predict(rows) == [("The parcel is late.", None), ("no sentence end here", None),
                                                ("Where is it?", None), ("first line", None)]


def test_a_baseline_that_does_not_fit_the_task_is_refused_at_its_line(make_recipe, tiny_model_dir: Path) -> None:
    from microtune.config import load_recipe
    from microtune.core.errors import RecipeError

    path = make_recipe(tiny_model_dir, task={"type": "generate", "labels": None}, eval={"baselines": ["zero_shot", "classical"]},
                       gate={"beat_classical": True})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = path.read_text().splitlines()
    problems = {p.where.split()[-1]: p for p in info.value.problems}
    assert set(problems) == {"eval.baselines.1", "gate.beat_classical"}
    classical_line = int(problems["eval.baselines.1"].where.split()[0].rsplit(":", 1)[1])
    assert lines[classical_line - 1].strip() == "- classical"
    assert "'classical' does not fit task.type generate; its baselines are: zero_shot, few_shot, lead" in problems["eval.baselines.1"].message
    assert "needs a task type with the classical baseline (classify)" in problems["gate.beat_classical"].message
    extract = make_recipe(tiny_model_dir, task={"type": "extract", "labels": None, "fields": {"a": "b"}}, eval={"baselines": ["lead"]})
    with pytest.raises(RecipeError, match="'lead' does not fit task.type extract; its baselines are: zero_shot, few_shot"):
        load_recipe(extract)
    assert load_recipe(make_recipe(tiny_model_dir, eval={"baselines": ["classical", "zero_shot"]})).eval.baselines == ["classical", "zero_shot"]


def test_endpoint_names_must_differ_from_every_baseline(make_recipe, tiny_model_dir: Path) -> None:
    from microtune.config import load_recipe
    from microtune.core.errors import RecipeError

    path = make_recipe(tiny_model_dir, eval={"endpoints": [{"name": "lead", "base_url": "http://x/v1", "model": "m"}]})
    with pytest.raises(RecipeError, match=r"differ from zero_shot, few_shot, classical, lead, micro; got \['lead'\]"):
        load_recipe(path)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """check → train (2 steps: the micro-model stays random) → eval with the classical baseline → register → gate with
    gate.beat_classical, on rows the classical model solves perfectly."""
    import yaml

    from microtune import pipeline

    root = tmp_path_factory.mktemp("guard")
    write_jsonl(root / "train.jsonl", _rows(TRAIN_FILL))
    write_jsonl(root / "test.jsonl", _rows(TEST_FILL))
    recipe = {"name": "kw", "model": {"base": str(tiny_model_dir)},
              "task": {"type": "classify", "instruction": "Route the customer message.", "labels": sorted(KEYWORDS)},
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}},
              "train": {"max_steps": 2, "batch_size": 4, "max_seq_len": 64, "log_every": 1},
              "eval": {"baselines": ["classical"], "batch_size": 4, "n_resamples": 200, "latency_examples": 2},
              "gate": {"beat_classical": True}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"root": root, "recipe": root / "recipe.yaml", "result": pipeline.run(root / "recipe.yaml", workspace=root / "ws")}


@pytest.mark.slow
def test_classical_appears_in_every_eval_file(guarded: dict[str, Any]) -> None:
    folder = guarded["result"].eval_dir
    metrics = json.loads((folder / "metrics.json").read_text())
    assert list(metrics) == ["classical", "micro"]
    c = metrics["classical"]
    assert c["accuracy"] == 1.0 and c["ci"]["accuracy"] == [1.0, 1.0] and 0 < c["p_value_vs_micro"] <= 1
    assert c["examples_per_s"] > 0 and c["latency_n"] == 2 and c["latency_ms_p95"] >= c["latency_ms_p50"] > 0 and c["cost_basis"]
    stats = json.loads((folder / "stats.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert stats["comparisons"]["classical"]["mcnemar"]["c"] == sum(r["classical"]["pred"] == r["gold"] != r["micro"]["pred"] for r in rows)
    assert stats["intervals"]["classical"]["accuracy"]["value"] == 1.0
    assert all(r["classical"]["pred"] == r["gold"] and 0 < r["classical"]["prob"] <= 1 for r in rows)
    page = (folder / "report.html").read_text()
    assert "<td>classical</td>" in page and "micro vs classical" in page


@pytest.mark.slow
def test_gate_rejects_a_version_that_does_not_beat_the_classical_baseline(guarded: dict[str, Any]) -> None:
    decision, metrics = guarded["result"].decision, guarded["result"].metrics
    assert decision.verdict == "reject" and decision.reason.startswith("first version: accuracy")
    assert "does not beat the classical baseline" in decision.reason and "gate.beat_classical" in decision.reason
    guard = decision.details["classical"]
    assert guard["classical_value"] == 1.0 and guard["micro_value"] == pytest.approx(metrics["micro"]["accuracy"])
    assert guard["margin"] == pytest.approx(metrics["micro"]["accuracy"] - 1.0) and guard["required"] is True
    assert guard["test"] == "McNemar" and 0 < guard["p_value"] <= 1 and guard["source"] == "the eval's predictions.jsonl"
    saved = json.loads((guarded["root"] / "ws" / "kw" / "decisions" / "v1.json").read_text())
    assert saved["verdict"] == "reject" and saved["details"]["classical"]["margin"] == pytest.approx(guard["margin"])


@pytest.mark.slow
def test_without_the_option_the_margin_is_shown_and_the_version_promoted(guarded: dict[str, Any]) -> None:
    from microtune import pipeline
    from microtune.config import load_recipe

    recipe = load_recipe(guarded["recipe"], ["gate.beat_classical=false"])
    decision = pipeline.gate(recipe, guarded["result"].model_version, guarded["root"] / "ws")
    assert decision.verdict == "promote" and decision.reason == "first version: no champion to beat"
    assert decision.details["classical"]["margin"] < 0 and decision.details["classical"]["required"] is False


@pytest.mark.slow
def test_the_gate_fits_the_classical_model_itself_when_the_eval_did_not(guarded: dict[str, Any]) -> None:
    """Deterministic: fitted again on the train split, it gives the eval's own answers on the frozen rows."""
    from microtune.config import load_recipe
    from microtune.pipeline.gate import _classical_predictions

    folder, dataset_dir = guarded["result"].eval_dir, guarded["result"].dataset_dir
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    task = get_task(ClassifyConfig(instruction="Route the customer message.", labels=sorted(KEYWORDS)), sorted(KEYWORDS))
    recipe = load_recipe(guarded["recipe"])
    preds, source = _classical_predictions(recipe, task, [{k: v for k, v in r.items() if k != "classical"} for r in rows],
                                           dataset_dir)
    assert preds == [r["classical"]["pred"] for r in rows] and source == "fitted by the gate on the dataset's train split"


@pytest.mark.slow
def test_lead_appears_in_every_eval_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    import yaml

    from microtune import pipeline
    from toydata import GENERATE_ROWS

    write_jsonl(tmp_path / "train.jsonl", [{"text": t, "target": s} for t, s in GENERATE_ROWS[:8]])
    write_jsonl(tmp_path / "test.jsonl", [{"text": f"{t}. thanks", "target": s} for t, s in GENERATE_ROWS[8:12]])
    recipe = {"name": "gen", "model": {"base": str(tiny_model_dir)},
              "task": {"type": "generate", "instruction": "Summarise the message.", "max_new_tokens": 4},
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}},
              "train": {"max_steps": 1, "batch_size": 4, "max_seq_len": 96}, "tracking": {"register_model": False},
              "eval": {"baselines": ["lead"], "batch_size": 4, "n_resamples": 200, "latency_examples": 1}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    folder = pipeline.run(tmp_path / "recipe.yaml", workspace=tmp_path / "ws").eval_dir
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["lead"]["pred"] for r in rows] == [f"{t}." for t, _ in GENERATE_ROWS[8:12]]  # the text up to its added ". thanks"
    metrics = json.loads((folder / "metrics.json").read_text())
    scores = get_task(GenerateConfig(instruction="x")).example_scores([r["gold"] for r in rows], [r["lead"]["pred"] for r in rows])
    assert list(metrics) == ["lead", "micro"] and metrics["lead"]["rouge_l"] == pytest.approx(sum(scores) / 4) and sum(scores) > 0
    assert "rouge_l" in json.loads((folder / "stats.json").read_text())["comparisons"]["lead"]["metrics"]
    assert "<td>lead</td>" in (folder / "report.html").read_text()


def test_the_headline_p_value_tests_the_main_metric() -> None:
    """McNemar tests per-row correctness: it stands for accuracy (or exact match) only; for macro-F1 the table shows the
    paired bootstrap of macro-F1 (a class-balanced micro-model can win on macro-F1 and lose on accuracy)."""
    from microtune.evaluation.runner import headline_p

    comparison = {"mcnemar": {"mid_p": 1e-9}, "metrics": {"accuracy": {"p_value": 0.001}, "macro_f1": {"p_value": 0.002}}}
    assert headline_p(comparison, "accuracy") == 1e-9 and headline_p(comparison, "exact_match") == 1e-9
    assert headline_p(comparison, "macro_f1") == 0.002
    assert headline_p({"metrics": {"rouge_l": {"p_value": 0.03}}}, "rouge_l") == 0.03


def test_classical_is_balanced_as_the_micro_model_trains() -> None:
    """faa-maintenance (one cause ~70 % of train, `train.balance: auto` → sample): weighed like the micro-model's rows,
    the classical baseline answers the rarer causes too, and its macro-F1 (the recipe's main metric) rises; a recipe
    whose labels are even, or a task without labels, is fitted unweighted."""
    from pathlib import Path

    from microtune.core.jsonl import read_jsonl
    from microtune.data.balance import row_weights

    folder = Path(__file__).resolve().parents[2] / "recipes" / "data" / "faa-maintenance"
    train = [{"text": r["text"], "label": r["cause"]} for r in read_jsonl(folder / "train.jsonl")]
    test = [{"text": r["text"], "label": r["cause"]} for r in read_jsonl(folder / "test.jsonl")]
    task = get_task(ClassifyConfig(instruction="Name the cause."), sorted({r["label"] for r in train}))
    weights = row_weights(train, "auto", 1.0)
    assert weights is not None and len(weights) == len(train)
    golds = [r["label"] for r in test]
    plain = [a for a, _ in classical.fit(task, train).predict(test)]
    balanced = [a for a, _ in classical.fit(task, train, weights).predict(test)]
    assert len(set(balanced)) > len(set(plain))
    assert task.metrics(golds, balanced)["macro_f1"] > task.metrics(golds, plain)["macro_f1"] + 0.1
    assert row_weights(_rows(TRAIN_FILL), "auto", 1.0) is None and row_weights([{"text": "x"}], "auto", 1.0) is None
