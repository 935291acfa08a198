"""The filter cascade's every reject path, the PII checks, and the parsing of teacher answers (no server needed)."""
from __future__ import annotations

from typing import Any

import pytest

from microtune.config import SynthConfig, SynthFilterConfig
from microtune.synthesis.filters import Cascade, find_pii, iban_ok, judge_says_no, luhn_ok
from microtune.synthesis.plan import build_plan, parse_answer, quotas, split_holdout, validate_item
from microtune.tasks import ClassifyConfig, SynthHooks, get_task
from toydata import LABELS, TEXTS


def real_rows() -> list[dict[str, Any]]:
    return [{"text": TEXTS[label][i], "label": label, "source": f"train.jsonl:{i * 3 + j + 1}"}
            for i in range(6) for j, label in enumerate(LABELS)]


def _hooks(**cfg: Any) -> SynthHooks:
    hooks = get_task(ClassifyConfig(instruction="Route it.", **cfg), LABELS).synth()
    assert hooks is not None
    return hooks


def row(text: str, label: str, i: int = 0) -> dict[str, Any]:
    return {"text": text, "label": label, "source": f"synthetic:{i}:0", "scores": {}}


def run(rows: list[dict[str, Any]], **cfg: Any) -> Cascade:
    """The cascade over toy real rows (3-8 words, so the length band is widened unless a test sets it)."""
    real = real_rows()
    cascade = Cascade(SynthFilterConfig(**{"length_slack": 3.0, **cfg}), LABELS, real, real + [{"text": "the courier lost my tv", "label": "shipping",
                                                                     "source": "test.jsonl:1"}])
    cascade.kept = cascade.run(rows)  # type: ignore[attr-defined]
    return cascade


def reasons(cascade: Cascade) -> dict[str, str]:
    return {r["text"]: r["reason"] for r in cascade.rejected}


def test_a_clean_paraphrase_passes_every_stage_with_its_scores() -> None:
    c = run([row("i see a charge on my statement that i do not recognise", "billing")])
    assert c.rejected == []
    scores = c.kept[0]["scores"]  # type: ignore[attr-defined]
    assert scores["words"] == 12 and 0 < scores["copy_rouge_l"] < 0.8 and scores["probe_top"] == "billing"


def test_length_outside_the_real_band_is_rejected() -> None:
    long = " ".join(["my invoice"] * 40)
    c = run([row(long, "billing"), row("the fee on my bill is wrong", "billing", 1)], length_slack=0.5)
    assert reasons(c) == {long: "length"}
    assert c.rejected[0]["detail"] == "80 words, outside the real band [2, 13] of 'billing'"
    assert c.counts["length"] == {"billing": 1}


@pytest.mark.parametrize("text", ["I'm sorry, but I cannot help with writing that request", "As an AI model I do not have an invoice",
                                  "Sure! my card was billed with an odd fee", "Example 3: my parcel did not come today",
                                  "hello [customer name], your parcel is late"])
def test_refusals_and_boilerplate_are_rejected(text: str) -> None:
    assert reasons(run([row(text, "shipping")])) == {text: "refusal"}


def test_a_pattern_common_in_real_rows_is_not_boilerplate() -> None:
    real = [{"text": f"example: parcel {i} is late", "label": "shipping", "source": f"r:{i}"} for i in range(20)]
    cascade = Cascade(SynthFilterConfig(label_check=False), LABELS, real, real)
    kept = cascade.run([row("example: the box did not come this week", "shipping")])
    assert len(kept) == 1 and cascade.rejected == []


@pytest.mark.parametrize(("text", "kind"), [
    ("email me at jo.smith+bills@example.co.uk about the fee", "email"),
    ("call me back on 415-555-0132 about my bill", "phone"),
    ("my number is +44 20 7946 0958 for the refund", "phone"),
    ("the charge on card 4111 1111 1111 1111 is wrong", "card"),
    ("refund to GB82 WEST 1234 5698 7654 32 please", "iban"),
    ("my ssn 123-45-6789 was on the invoice", "ssn"),
])
def test_pii_is_found_and_rejected(text: str, kind: str) -> None:
    assert find_pii(text) == kind
    c = run([row(text, "billing")], label_check=False)
    assert reasons(c) == {text: "pii"} and kind in c.rejected[0]["detail"]


def test_numbers_that_fail_their_checksums_are_not_pii() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB83WEST12345698765432")
    assert find_pii("order 4111 1111 1111 1112 has not arrived") is None
    assert find_pii("flight 1234 left at 10:45 with 3 bags") is None


def test_pii_filter_off_keeps_the_row() -> None:
    text = "email me at jo@example.com about the fee"
    assert run([row(text, "billing")], pii=False, label_check=False).rejected == []


def test_copies_of_real_rows_are_rejected_including_test_rows() -> None:
    train_copy, test_copy = "my card was charged twice!", "The courier lost my TV"
    c = run([row(train_copy, "billing"), row(test_copy, "shipping", 1)], label_check=False)
    assert reasons(c) == {train_copy: "copy", test_copy: "copy"}
    assert "test.jsonl:1" in [r["detail"] for r in c.rejected if r["text"] == test_copy][0]


def test_near_duplicates_within_the_synthetic_set_keep_the_first() -> None:
    a, b = "please refund my broken coffee mug", "refund my broken coffee mug please"
    c = run([row(a, "refund"), row(b, "refund", 1)], label_check=False)
    assert reasons(c) == {b: "near_duplicate"} and [r["text"] for r in c.kept] == [a]  # type: ignore[attr-defined]


def test_the_probe_rejects_a_label_the_real_rows_contradict() -> None:
    wrong = "where is my parcel, the package has not arrived and tracking does not work"
    c = run([row(wrong, "refund"), row("the package has not arrived and delivery is late", "shipping", 1)], probe_top_k=1)
    assert reasons(c) == {wrong: "probe"}
    assert "top 1" in c.rejected[0]["detail"] and c.rejected[0]["scores"]["probe_top"] == "shipping"
    assert run([row(wrong, "refund")], label_check=False).rejected == []


def test_the_judge_answer_is_read_strictly() -> None:
    assert judge_says_no("No.") is True and judge_says_no("yes, it is") is False and judge_says_no("maybe") is None
    assert judge_says_no(None) is None


@pytest.mark.parametrize(("content", "problem", "n"), [
    ('{"examples": [{"text": "a", "label": "x"}', "not valid JSON", 0),
    ("```json\n{\"examples\": [{\"text\": \"a\", \"label\": \"x\"}]}\n```", None, 1),
    ('Here you go: {"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]} enjoy', None, 2),
    ('[{"text": "a", "label": "x"}]', None, 1),
    ('{"examples": []}', "JSON has no list of examples", 0),
    ("", "empty answer", 0),
    (None, "empty answer", 0),
])
def test_answers_are_parsed_or_rejected_with_the_problem(content: str | None, problem: str | None, n: int) -> None:
    items, found = parse_answer(content)
    assert found == problem and len(items) == n


def test_items_are_validated_by_the_task_schema() -> None:
    hooks = _hooks(text_field="message", label_field="intent")  # the answer's keys are fixed, whatever the recipe's field names
    assert validate_item({"text": "  my  bill ", "label": "billing"}, hooks) == ({"text": "my bill", "label": "billing"}, None)
    assert validate_item({"label": "billing"}, hooks)[1] == "missing field 'text' (got keys ['label'])"
    assert validate_item({"text": 3, "label": "billing"}, hooks)[1] == "field 'text' is not a string (got 3)"
    assert validate_item({"text": " ", "label": "billing"}, hooks)[1].startswith("field 'text' is empty")
    assert validate_item("just a string", hooks)[1] == "an example must be a JSON object (got str)"


def test_plan_fixes_the_label_first_rotates_exemplars_and_cycles_attributes() -> None:
    holdout, pool = split_holdout(real_rows(), 0.3, seed=1)
    assert {r["source"] for r in holdout}.isdisjoint({r["source"] for r in pool})
    assert all(sum(r["label"] == label for r in holdout) == 2 for label in LABELS)
    cfg = SynthConfig(per_label=6, examples_per_request=2, exemplars=2, exemplar_max_uses=3, oversample=1.0,
                      attributes={"channel": ["email", "chat", "phone"]})
    plan = build_plan(cfg, _hooks(), LABELS, pool, quotas(cfg, LABELS, pool))
    assert [p.label for p in plan] == ["billing"] * 3 + ["shipping"] * 3 + ["refund"] * 3
    shown = [r["source"] for p in plan for r in p.exemplars]
    assert max(shown.count(s) for s in shown) <= 3
    assert not {r["source"] for r in holdout} & set(shown)  # held-out rows are never shown to the teacher
    assert sorted(p.attributes["channel"] for p in plan[:3]) == ["chat", "email", "phone"]
    assert 'Label: billing' in plan[0].messages[1]["content"] and "channel = " in plan[0].messages[1]["content"]


def test_total_splits_over_labels_by_proportions() -> None:
    pool = real_rows()
    assert quotas(SynthConfig(total=10), LABELS, pool) == {"billing": 4, "shipping": 3, "refund": 3}
    assert quotas(SynthConfig(total=10, proportions={"refund": 1, "billing": 4}), LABELS, pool) == {"billing": 8, "shipping": 0, "refund": 2}
    from microtune.core.errors import RecipeError

    with pytest.raises(RecipeError, match="not in the task"):
        quotas(SynthConfig(total=10, proportions={"refnd": 1}), LABELS, pool)


def test_synth_recipe_errors_name_the_field_and_the_nearest_key(tmp_path) -> None:
    from microtune.config import load_recipe
    from microtune.core.errors import RecipeError

    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask: {instruction: go}\ndata: {train: t.jsonl}\nsynth:\n  per_lable: 5\n  teacher: {base_url: http://h/v1}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "r.yaml:5 synth.per_lable: unknown key 'per_lable'; did you mean 'per_label'?" in text
    assert "teacher.model is required for base_url 'http://h/v1'" in text


def test_the_cascade_runs_only_the_filters_the_task_applies() -> None:
    real = real_rows()
    copy = row(real[0]["text"], real[0]["label"])
    full = Cascade(SynthFilterConfig(length_slack=3.0), LABELS, real, real)
    assert full.run([copy]) == [] and [r["reason"] for r in full.rejected] == ["copy"]
    some = Cascade(SynthFilterConfig(length_slack=3.0), LABELS, real, real, stages=("length", "refusal"))
    assert some.run([copy]) == [copy] and some.rejected == [] and set(some.entered) == {"length", "refusal"}


def test_a_filter_switched_on_that_the_task_type_leaves_out_is_an_error() -> None:
    from microtune.core.errors import RecipeError
    from microtune.synthesis.stage import _filters_apply

    hooks = _hooks()
    cfg = SynthConfig(per_label=2, filters={"judge": True})
    _filters_apply(cfg, hooks)  # classify applies every filter
    fewer = SynthHooks(hooks.request, hooks.parse_row, hooks.answer_row, filters=("length", "copy", "pii", "probe"))
    with pytest.raises(RecipeError, match="synth.filters.judge is on, but the judge filter does not apply") as err:
        _filters_apply(cfg, fewer)
    assert err.value.hint == "set synth.filters.judge=false"
    with pytest.raises(ValueError, match="unknown filter stage"):
        _filters_apply(cfg, SynthHooks(hooks.request, hooks.parse_row, hooks.answer_row, filters=("spelling",)))
