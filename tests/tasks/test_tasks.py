"""Task types: normalisation errors, output parsing on malformed model output, metrics against hand-computed fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from microtune.config import validate_recipe
from microtune.core.errors import DataError, RecipeError
from microtune.tasks import ClassifyConfig, ExtractConfig, GenerateConfig, TaskSection, get_task
from microtune.tasks.generate import best_rouge, rouge, rouge_l
from toydata import write_jsonl

FIELDS = {"drug": "the drug", "effect": "the adverse effect", "dosage": "the dose"}


def _cfg(type: str = "classify", **kw) -> TaskSection:
    config = {"classify": ClassifyConfig, "extract": ExtractConfig, "generate": GenerateConfig}[type]
    return config(instruction="Do it.", **kw)


# -- classify ---------------------------------------------------------------------------------------
def test_multi_label_rows_candidates_and_parse() -> None:
    cfg = _cfg(multi_label=True, max_labels=2)
    cls = get_task(cfg, ["billing", "refund", "shipping"])
    ex, problems = cls.normalize({"text": "x", "label": "shipping; billing"}, cfg)
    assert not problems and ex == {"text": "x", "label": "billing; shipping", "labels": ["billing", "shipping"]}
    assert cls.normalize({"text": "x", "label": ["refund"]}, cfg)[0]["label"] == "refund"
    _, problems = cls.normalize({"text": "x", "label": "a;b;c"}, cfg)
    assert problems[0][0] == "3 labels, more than task.max_labels=2"
    assert cls.candidates() == ["billing", "refund", "shipping", "billing; refund", "billing; shipping", "refund; shipping"]
    assert cls.parse("Shipping, billing.") == "billing; shipping"  # any order, comma or semicolon, case
    assert cls.parse("billing; refund; shipping") is None  # three labels: not a valid answer


def test_multi_label_metrics_by_hand() -> None:
    cls = get_task(_cfg(multi_label=True), ["a", "b", "c"])
    golds = ["a; b", "c", "a"]
    preds = ["a", "c", None]
    m = cls.metrics(golds, preds)
    # label a: gold in ex1, ex3; predicted in ex1 → tp 1, fn 1 → F1 2/3. b: fn 1 → 0. c: tp 1 → 1.
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["per_label_f1"] == pytest.approx({"a": 2 / 3, "b": 0.0, "c": 1.0})
    assert m["macro_f1"] == pytest.approx(5 / 9)
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))  # tp 2, fp 0, fn 2
    assert m["valid_rate"] == pytest.approx(2 / 3)


def test_out_of_scope_metrics_by_hand() -> None:
    cls = get_task(_cfg(none_label="oos"), ["pay", "card", "oos"])
    golds = ["pay", "card", "oos", "oos", "pay"]
    preds = ["pay", "oos", "oos", "card", "pay"]
    m = cls.metrics(golds, preds)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["in_scope_accuracy"] == pytest.approx(2 / 3)  # pay ✓, card ✗, pay ✓
    assert m["oos_recall"] == pytest.approx(1 / 2)
    assert m["oos_precision"] == pytest.approx(1 / 2)  # flagged: ex2 (card) and ex3 (oos)


# -- extract ----------------------------------------------------------------------------------------
def test_extract_rows_report_every_problem() -> None:
    cfg = _cfg(type="extract", fields=FIELDS)
    ex, problems = get_task(cfg).normalize({"text": "t", "target": '{"drug": "aspirin", "dose": "5 mg"}'}, cfg)
    assert ex is None and problems[0][0].startswith("unknown output field 'dose'; did you mean 'dosage'?")
    _, problems = get_task(cfg).normalize({"text": "t", "target": "{not json"}, cfg)
    assert problems[0][0].startswith("field 'target' is not a JSON object")
    _, problems = get_task(cfg).normalize({"text": "t", "target": {"drug": 5}}, cfg)
    assert problems == [("output field 'drug' must be a string, a list of strings or null", 5)]
    ok, _ = get_task(cfg).normalize({"text": "t", "target": {"drug": "aspirin", "effect": ["rash", "itch"]}}, cfg)
    assert ok["output"] == {"drug": "aspirin", "effect": ["rash", "itch"], "dosage": None}


@pytest.mark.parametrize("raw, parsed", [
    ('{"drug": "aspirin", "effect": "rash", "dosage": null}', {"drug": "aspirin", "effect": "rash", "dosage": None}),
    ('Sure! ```json\n{"drug": "aspirin", "extra": 1}\n``` hope it helps', {"drug": "aspirin", "effect": None, "dosage": None}),
    ('{"drug": ["a", "b"], "effect": 3, "dosage": ""}', {"drug": ["a", "b"], "effect": "3", "dosage": None}),
    ('{"drug": "aspirin", "effect": "ra', None),  # cut off by max_new_tokens
    ('["aspirin"]', None),
    ("I cannot help with that.", None),
    ('{bad} then {"drug": "x"}', {"drug": "x", "effect": None, "dosage": None}),
])
def test_extract_parses_malformed_output(raw: str, parsed: dict | None) -> None:
    assert get_task(_cfg(type="extract", fields=FIELDS)).parse(raw) == parsed


def test_extract_metrics_by_hand() -> None:
    task = get_task(_cfg(type="extract", fields=FIELDS))
    golds = [{"drug": "Aspirin", "effect": ["rash", "fever"], "dosage": None},
             {"drug": "insulin", "effect": "lipoatrophy", "dosage": "10 units"}]
    preds = [{"drug": "aspirin", "effect": ["rash"], "dosage": None}, None]
    m = task.metrics(golds, preds)
    # exact: drug tp0 fp1 fn2; effect tp1 fp0 fn2; dosage tp0 fp0 fn1 → pooled tp1 fp1 fn5
    assert m["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 5))
    # normalised: "Aspirin" = "aspirin" → drug tp1 fn1 → pooled tp2 fp0 fn4
    assert m["micro_f1_normalized"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 4))
    assert m["per_field"]["effect"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "f1_normalized": 0.5, "support": 3})
    assert m["macro_f1"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert m["valid_rate"] == 0.5
    assert task.example_scores(golds, preds) == pytest.approx([2 * 1 / (2 * 1 + 1 + 2), 0.0])  # ex1: tp1 fp1 fn2
    assert task.target({"output": golds[1]}) == '{"drug": "insulin", "effect": "lipoatrophy", "dosage": "10 units"}'


# -- generate ---------------------------------------------------------------------------------------
def test_rouge_l_by_hand() -> None:
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # LCS 5 of 6 and 6
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("Deep nets, trained.", "deep nets trained") == 1.0  # case and punctuation ignored


def test_rouge_is_stemmed_and_reports_one_two_and_l() -> None:
    # rouge-score with Porter stemming: models/model and trained/training match, "were"/"was" do not (LCS 3 of 4 and 4);
    # the unstemmed hand-written ROUGE-L matched only "the" (0.25)
    assert rouge_l("the models were trained", "the model was training") == pytest.approx(3 / 4)
    r1, r2, rl = rouge("the cat sat on the mat", "the cat is on the mat")
    assert (r1, r2, rl) == pytest.approx((5 / 6, 3 / 5, 5 / 6))  # bigrams shared: "the cat", "on the", "the mat" of 5 each
    # best per type over references: ROUGE-1 from the first reference, ROUGE-2 and ROUGE-L from the second
    assert best_rouge("a b c d", ["d c b a", "a b x y"]) == pytest.approx((1.0, 1 / 3, 0.5))


def test_generate_scores_the_best_reference() -> None:
    cfg = _cfg(type="generate")
    task = get_task(cfg)
    ex, _ = task.normalize({"text": "abstract", "target": ["we prove a bound", "a new bound is shown"]}, cfg)
    assert task.target(ex) == "we prove a bound" and task.gold(ex) == ["we prove a bound", "a new bound is shown"]
    m = task.metrics([task.gold(ex), ["one two three four"]], ["a new bound is shown", None])
    assert m["rouge_l"] == pytest.approx((1.0 + 0.0) / 2) and m["rouge_1"] == m["rouge_2"] == pytest.approx(0.5)
    assert m["valid_rate"] == 0.5 and m["pred_words_mean"] == pytest.approx(2.5)
    assert m["length_ratio"] == pytest.approx(2.5 / 4)


# -- recipe and data checks ------------------------------------------------------------------------
def test_recipe_rules_between_task_keys() -> None:
    base = {"name": "x", "data": {"train": "t.jsonl"}}
    with pytest.raises(RecipeError) as err:
        validate_recipe({**base, "task": {"type": "extract", "instruction": "x"}})
    assert "task.type extract needs task.fields" in str(err.value.problems[0])
    with pytest.raises(RecipeError) as err:
        validate_recipe({**base, "task": {"type": "generate", "instruction": "x", "labels": ["a"]}})
    assert "task.labels: key 'labels' is not valid for task.type generate; it applies to task.type classify" in str(err.value.problems[0])
    with pytest.raises(RecipeError) as err:
        validate_recipe({**base, "task": {"type": "generate", "instruction": "x"}, "eval": {"metrics": ["accuracy"]}})
    assert "eval.metrics: 'accuracy' not reported for this task (one of: rouge_l" in str(err.value.problems[0])
    assert validate_recipe({**base, "task": {"type": "extract", "instruction": "x", "fields": FIELDS}}).metric_names()[0] == "micro_f1"


def test_check_reports_bad_extract_rows_with_file_and_line(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline

    rows = [{"text": "aspirin gave a rash", "target": {"drug": "aspirin", "effect": "rash"}},
            {"text": "no target here"},
            {"text": "x", "target": {"drug": "a", "side_effect": "b"}}]
    train = write_jsonl(tmp_path / "ex.jsonl", rows)
    recipe = make_recipe(tiny_model_dir, data={"train": train.name}, task={"type": "extract", "labels": None, "fields": FIELDS})
    with pytest.raises(DataError) as err:
        pipeline.check(recipe, workspace=tmp_path / "ws")
    problems = [str(p) for p in err.value.problems]
    assert problems[0].startswith(f"{train}:2: missing field 'target'")
    assert problems[1].startswith(f"{train}:3: unknown output field 'side_effect'")
    assert not (tmp_path / "ws" / "toy" / "datasets").exists() or not list((tmp_path / "ws" / "toy" / "datasets").iterdir())


@pytest.mark.parametrize("kind", ["extract", "generate"])
@pytest.mark.slow
def test_run_end_to_end_for_free_text_tasks(tmp_path: Path, make_recipe, tiny_model_dir: Path, kind: str) -> None:
    """check → train → eval on a tiny model: metrics of every system, raw outputs kept for inspection."""
    from microtune import pipeline

    drugs = ["aspirin", "insulin", "warfarin", "ibuprofen", "heparin", "codeine"]
    effects = ["rash", "bleeding", "nausea", "fever", "headache", "itching"]
    rows = [{"text": f"Patient on {d} developed {e} on day {i}.",
             "target": {"drug": d, "effect": e} if kind == "extract" else f"{d} caused {e}"}
            for i, (d, e) in enumerate((d, e) for d in drugs for e in effects)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30])
    test = write_jsonl(tmp_path / "test.jsonl", rows[30:])
    task = {"type": kind, "labels": None, "max_new_tokens": 12} | ({"fields": FIELDS} if kind == "extract" else {})
    recipe = make_recipe(tiny_model_dir, data={"train": train.name, "test": test.name, "split": {"valid": 0.0}},
                         task=task, train={"max_steps": 4})
    result = pipeline.run(recipe, workspace=tmp_path / "ws")
    main = "micro_f1" if kind == "extract" else "rouge_l"
    assert set(result.metrics) == {"zero_shot", "few_shot", "micro"}
    assert all(0.0 <= m[main] <= 1.0 and m["examples"] == 6 for m in result.metrics.values())
    rows_out = [json.loads(line) for line in (result.eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows_out) == 6 and all("raw" in r["micro"] and "gold" in r for r in rows_out)
    manifest = json.loads((result.eval_dir / "manifest.json").read_text())
    assert manifest["main_metric"] == main
