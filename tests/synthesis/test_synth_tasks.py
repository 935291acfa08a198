"""Synth for the task types without labels: extract (planned by filled fields, values grounded in the text) and
generate (one stratum, the target's length and copying checked) — plan, row schema, filters, fidelity, the tuned
teacher's rows, and `microtune synth` end to end against the fake OpenAI-protocol teacher."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fake_teacher import (
    FakeTeacher,
    extract_examples,
    extract_recipe_factory,
    filled_of,
    generate_recipe_factory,
    good_extract_answer,
    good_generate_answer,
    n_of,
)
from microtune.cli import app
from microtune.config import FidelityConfig, SynthConfig, SynthFilterConfig, load_recipe
from microtune.core.errors import RecipeError
from microtune.pipeline import synth, train
from microtune.synthesis import synthetic_for_training
from microtune.synthesis.fidelity import fidelity, write_html
from microtune.synthesis.filters import Cascade
from microtune.synthesis.plan import build_plan, quotas, split_holdout, strata, tuning_rows, validate_item, with_strata
from microtune.synthesis.stage import synth_config
from microtune.tasks import ExtractConfig, GenerateConfig, get_task
from toydata import EXTRACT_FIELDS, EXTRACT_ROWS, GENERATE_ROWS


def extract_task() -> Any:
    return get_task(ExtractConfig(instruction="Extract the product and the problem.", fields=EXTRACT_FIELDS))


def generate_task() -> Any:
    return get_task(GenerateConfig(instruction="Summarise the message."))


def extract_real() -> list[dict[str, Any]]:
    return [{"text": t, "output": {"product": p, "problem": q}, "source": f"train.jsonl:{i + 1}"} for i, (t, p, q) in enumerate(EXTRACT_ROWS)]


def generate_real() -> list[dict[str, Any]]:
    return [{"text": t, "target": s, "references": [s], "source": f"train.jsonl:{i + 1}"} for i, (t, s) in enumerate(GENERATE_ROWS)]


def candidate(stratum: str, i: int = 0, **example: Any) -> dict[str, Any]:
    return {**example, "stratum": stratum, "source": f"synthetic:{i}:0", "scores": {}}


def cascade_for(task: Any, real: list[dict[str, Any]], stages: tuple[str, ...] | None = None, **cfg: Any) -> Cascade:
    hooks = task.synth()
    rows = with_strata(real, hooks)
    return Cascade(SynthFilterConfig(**{"length_slack": 1.0, **cfg}), strata(hooks, [], rows), rows, rows, stages=stages or hooks.filters,
                   pooled_band=True)


def reasons(cascade: Cascade) -> dict[str, str]:
    return {r["text"]: r["reason"] for r in cascade.rejected}


# -- extract: plan and row schema ------------------------------------------------------------------

def test_extract_plans_by_filled_fields_and_shows_only_rows_of_the_same_kind() -> None:
    hooks = extract_task().synth()
    holdout, pool = split_holdout(with_strata(extract_real(), hooks), 0.3, seed=1)
    names = strata(hooks, [], pool)
    assert names == ["product", "product + problem"]
    assert {r["stratum"] for r in holdout} == set(names)  # the holdout is stratified by filled fields too
    cfg = SynthConfig(total=10, examples_per_request=2, exemplars=2, oversample=1.0, proportions="real")
    quota = quotas(cfg, names, pool, hooks, "extract")
    assert quota == {"product": 4, "product + problem": 6} and sum(quota.values()) == 10  # the real mix: 4 vs 7 pool rows
    assert quotas(SynthConfig(total=10), names, pool, hooks, "extract") == {"product": 5, "product + problem": 5}
    plan = build_plan(cfg, hooks, names, pool, quota)
    assert [p.label for p in plan] == ["product"] * 2 + ["product + problem"] * 3
    for p in plan:
        assert all(hooks.stratum(r) == p.label for r in p.exemplars)
        assert not {r["source"] for r in holdout} & {r["source"] for r in p.exemplars}
    user = plan[0].messages[1]["content"]
    assert "Filled fields: product\nNull fields: problem" in user and "Write 2 new" in user
    assert '"output": {"product": "' in plan[0].messages[0]["content"]  # the answer's shape names the recipe's fields
    shown = json.loads(user.split("Real examples:\n")[1].splitlines()[0])
    assert set(shown) == {"text", "output"} and shown["output"]["problem"] is None


@pytest.mark.parametrize(("synth", "match", "fix"), [
    ({"per_label": 5}, "synth.per_label asks for rows per label, but task.type extract has no labels", "synth.total"),
    ({"total": 5, "proportions": {"product": 1.0}}, "synth.proportions maps labels to weights, but task.type extract", "uniform"),
])
def test_label_quotas_on_extract_are_refused_with_the_fix(synth: dict[str, Any], match: str, fix: str) -> None:
    hooks = extract_task().synth()
    with pytest.raises(RecipeError, match=match) as err:
        quotas(SynthConfig(**synth), ["product"], [], hooks, "extract")
    assert fix in (err.value.hint or "")


def test_extract_items_are_checked_with_exactly_the_recipe_fields() -> None:
    hooks = extract_task().synth()
    good = {"text": " the  fan is  noisy ", "output": {"product": "fan", "problem": "noisy"}}
    assert validate_item(good, hooks) == ({"text": "the fan is noisy", "output": {"product": "fan", "problem": "noisy"}}, None)
    as_text = {"text": "the fan", "output": json.dumps({"product": "fan", "problem": None})}
    assert validate_item(as_text, hooks)[0] == {"text": "the fan", "output": {"product": "fan", "problem": None}}
    assert validate_item({"text": "a fan", "output": {"product": "fan"}}, hooks)[1] == \
        "the object's keys must be exactly product, problem; missing ['problem']"
    assert "unknown ['colour']" in validate_item({"text": "a", "output": {"product": "a", "problem": None, "colour": "red"}}, hooks)[1]
    assert "must be a string, a list of strings or null" in validate_item({"text": "a", "output": {"product": 3, "problem": None}}, hooks)[1]
    assert validate_item({"output": {"product": "a", "problem": None}}, hooks)[1].startswith("missing field 'text'")
    assert "not a JSON object" in validate_item({"text": "a", "output": "fan"}, hooks)[1]


# -- extract: the grounding filter ---------------------------------------------------------------

def test_grounding_keeps_values_found_in_the_text_and_rejects_the_others() -> None:
    ok = candidate("product + problem", text="The Hair-Dryer blows only cold air!",
                   output={"product": "hair dryer", "problem": "blows only the cold air"})  # case, punctuation, articles folded
    listed = candidate("product + problem", 1, text="the mug and the plate came chipped",
                       output={"product": ["mug", "plate"], "problem": "chipped"})
    null = candidate("product", 2, text="has the microwave shipped yet", output={"product": "microwave", "problem": None})
    invented = candidate("product + problem", 3, text="the heater is too hot to touch", output={"product": "heater", "problem": "overheats"})
    partial = candidate("product + problem", 4, text="the mug arrived chipped", output={"product": ["mug", "plate"], "problem": "chipped"})
    inside = candidate("product", 5, text="the cartoon arrived", output={"product": "car", "problem": None})  # word-bounded match
    c = cascade_for(extract_task(), extract_real(), pii=False)
    kept = c.run([ok, listed, null, invented, partial, inside])
    assert [r["source"] for r in kept] == ["synthetic:0:0", "synthetic:1:0", "synthetic:2:0"]
    assert reasons(c) == {invented["text"]: "grounding", partial["text"]: "grounding", inside["text"]: "grounding"}
    details = {r["text"]: r["detail"] for r in c.rejected}
    assert details[invented["text"]] == "field 'problem' value 'overheats' does not occur in the text"
    assert details[partial["text"]] == "field 'product' value 'plate' does not occur in the text"
    assert kept[1]["scores"]["grounded_values"] == 3 and c.counts["grounding"] == {"product + problem": 2, "product": 1}


def test_extract_rows_go_through_the_generic_stages_too() -> None:
    real = extract_real()
    copy = candidate("product + problem", text=real[0]["text"], output=real[0]["output"])
    twin_a = candidate("product", 1, text="could i exchange the duvet for a bigger size", output={"product": "duvet", "problem": None})
    twin_b = candidate("product", 2, text="could i exchange the duvet for a bigger size please", output={"product": "duvet", "problem": None})
    mail = candidate("product", 3, text="mail jo@example.com about the duvet", output={"product": "duvet", "problem": None})
    c = cascade_for(extract_task(), real)
    c.run([copy, twin_a, twin_b, mail])
    assert reasons(c) == {copy["text"]: "copy", twin_b["text"]: "near_duplicate", mail["text"]: "pii"}
    assert set(c.entered) == {"length", "refusal", "pii", "copy", "near_duplicate", "grounding"}  # no label probe


# -- generate: plan, row schema and filters ------------------------------------------------------

def test_generate_plans_one_stratum_and_refuses_label_weights() -> None:
    hooks = generate_task().synth()
    rows = with_strata(generate_real(), hooks)
    holdout, pool = split_holdout(rows, 0.3, seed=1)
    assert len(holdout) == 4 and strata(hooks, [], pool) == ["all"]
    cfg = SynthConfig(total=5, examples_per_request=2, exemplars=3, oversample=1.0)
    plan = build_plan(cfg, hooks, ["all"], pool, quotas(cfg, ["all"], pool, hooks, "generate"))
    assert [p.n for p in plan] == [2, 2, 1] and all(len(p.exemplars) == 3 for p in plan)
    shown = json.loads(plan[0].messages[1]["content"].split("Real examples:\n")[1].splitlines()[0])
    assert set(shown) == {"text", "target"} and "Write 2 new" in plan[0].messages[1]["content"]
    with pytest.raises(RecipeError, match="task.type generate has no labels"):
        quotas(SynthConfig(total=5, proportions={"all": 1.0}), ["all"], pool, hooks, "generate")


def test_generate_items_have_one_target_string() -> None:
    hooks = generate_task().synth()
    assert validate_item({"text": "my  order is late", "target": " late order "}, hooks) == \
        ({"text": "my order is late", "target": "late order", "references": ["late order"]}, None)
    assert validate_item({"text": "a", "target": ["x", "y"]}, hooks)[1] == "field 'target' must be one string (got ['x', 'y'])"
    assert validate_item({"text": "a"}, hooks)[1].startswith("missing field 'target'")
    assert validate_item({"text": "a", "target": "  "}, hooks)[1].startswith("field 'target' is empty")


def test_target_length_and_copies_are_rejected_with_the_reason() -> None:
    text = "the fridge i bought in may has stopped cooling and all the food in it went bad over the weekend"
    good = candidate("all", text=text, target="new fridge stopped cooling, food spoiled", references=[])
    long = candidate("all", 1, text="the oven door does not close properly since the engineer visited last tuesday",
                     target=" ".join(["the oven door will not close and i am upset about the engineer visit"] * 3), references=[])
    empty_ratio = candidate("all", 2, text="my order number is missing from the confirmation email that you sent", target="x", references=[])
    echo_text = "the kettle arrived with a dent in the side and the lid does not shut"
    echo = candidate("all", 3, text=echo_text, target=echo_text, references=[])
    real_copy = candidate("all", 4, text="i changed my mind about the bookcase and no longer want it delivered to me",
                          target="wants bookshelf order cancelled", references=[])
    lengths = cascade_for(generate_task(), generate_real(), stages=("target_length",), length_slack=0.5)
    assert lengths.run([good, long, empty_ratio]) == [good]
    assert reasons(lengths) == {long["text"]: "target_length", empty_ratio["text"]: "target_length"}
    details = {r["text"]: r["detail"] for r in lengths.rejected}
    assert details[long["text"]] == "target of 42 words for an input of 13: ratio 3.23, outside the real band [0.14, 0.72]"
    assert details[empty_ratio["text"]].startswith("target of 1 words for an input of 12: ratio 0.08, outside")
    copies = cascade_for(generate_task(), generate_real(), stages=("target_copy",))
    assert copies.run([good, echo, real_copy]) == [good]
    assert reasons(copies) == {echo_text: "target_copy", real_copy["text"]: "target_copy"}
    details = {r["text"]: r["detail"] for r in copies.rejected}
    assert details[echo_text].startswith("the target is a near-copy of its input (ROUGE-L 1.00")
    assert details[real_copy["text"]] == "the target is a near-copy of real row train.jsonl:10's target (ROUGE-L 1.00)"
    assert 0 < good["scores"]["target_ratio"] < 1 and good["scores"]["target_input_rouge_l"] < 0.8
    assert copies.counts["target_copy"] == {"all": 2}
    every = cascade_for(generate_task(), generate_real(), pii=False)  # the whole cascade: each row stops at its first reject
    assert every.run([{**r, "scores": {}} for r in (good, long, echo, real_copy)])[0]["source"] == "synthetic:0:0"
    assert set(every.entered) == {"length", "refusal", "pii", "copy", "near_duplicate", "target_length", "target_copy"}


def test_a_rewrite_task_whose_real_targets_resemble_their_inputs_is_not_rejected_for_it() -> None:
    """Real pairs as close as 0.89 (a punctuation fix): a synthetic pair at 0.88 is like them, not a copy; with
    summaries as the real pairs, the same pair is rejected."""
    pairs = [("could you send me the invoice for last march", "Could you send me the invoice for last March."),
             ("i want too return the lamp i got", "I want to return the lamp I got."),
             ("where is are my parcel", "Where is my parcel?"), ("the box was broke when it came", "The box was broken when it came.")]
    real = [{"text": t, "target": g, "references": [g], "source": f"t:{i}"} for i, (t, g) in enumerate(pairs)]
    rewrite = candidate("all", text="can i change the delivery day to friday", target="Can I change the delivery day to Friday?", references=[])
    c = cascade_for(generate_task(), real, pii=False)
    assert c.run([rewrite]) == [rewrite] and c.rejected == [] and rewrite["scores"]["target_input_rouge_l"] == 0.875
    summaries = cascade_for(generate_task(), generate_real(), stages=("target_copy",))
    assert summaries.run([{**rewrite, "scores": {}}]) == [] and reasons(summaries) == {rewrite["text"]: "target_copy"}


# -- fidelity, config checks, the tuned teacher's rows ---------------------------------------------

def test_fidelity_without_labels_reports_the_text_tests_and_the_strata(tmp_path: Path) -> None:
    real = with_strata(generate_real(), generate_task().synth())
    synthetic = [candidate("all", i, text=f"{r['text']} thanks", target=r["target"] + " now") for i, r in enumerate(real[:6])]
    report, p_synth = fidelity(real[6:], real[:6], synthetic, {"all": 6}, FidelityConfig(folds=2), seed=1, labelled=False)
    assert report["two_sample"]["auc"] is not None and len(p_synth) == 6
    assert report["distribution"]["words_mean"]["synthetic"] > 0 and report["target_distribution"]["words_mean"]["real"] > 0
    assert report["strata"]["per_label"]["all"] == {"planned": 6, "accepted": 6, "planned_share": 1.0, "accepted_share": 1.0}
    assert "labels" not in report and "probes" not in report  # the label-conditional parts need labels
    write_html(report, tmp_path / "f.html", "generate")
    page = (tmp_path / "f.html").read_text()
    assert "Strata: plan vs accepted" in page and "Targets: length" in page


def test_switches_that_need_labels_are_refused_on_extract(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    make = extract_recipe_factory(make_recipe, tiny_model_dir, tmp_path)
    assert synth_config(load_recipe(make("http://127.0.0.1:9/v1"))).filters.label_check is None  # the default: on only with labels
    for override, switch in (("synth.filters.label_check=true", "label_check"), ("synth.filters.judge=true", "judge")):
        with pytest.raises(RecipeError, match=f"synth.filters.{switch} is on, but the") as err:
            synth_config(load_recipe(make("http://127.0.0.1:9/v1"), [override]))
        assert err.value.hint == f"set synth.filters.{switch}=false"


@pytest.mark.parametrize("kind", ["extract", "generate"])
def test_the_tuned_teacher_learns_from_real_rows_answered_in_the_synth_shape(kind: str) -> None:
    task, real = (extract_task(), extract_real()) if kind == "extract" else (generate_task(), generate_real())
    hooks = task.synth()
    holdout, pool = split_holdout(with_strata(real, hooks), 0.3, seed=13)
    system, rows = tuning_rows(SynthConfig(total=4, exemplars=2), hooks, strata(hooks, [], pool), pool)
    answers = [json.loads(r["target"])["examples"][0] for r in rows]
    assert len(rows) == len(pool) and system.startswith("You write realistic")
    assert sorted(a["text"] for a in answers) == sorted(r["text"] for r in pool)
    assert not {r["text"] for r in holdout} & {a["text"] for a in answers}
    for row, answer in zip(rows, answers):
        assert validate_item(answer, hooks)[0] is not None  # the format the stage's row schema accepts
        assert "Write 1 new" in row["text"]
        if kind == "extract":
            assert f"Filled fields: {hooks.stratum(answer).replace(' + ', ', ')}" in row["text"]


# -- `microtune synth` end to end ------------------------------------------------------------------

def scripted_extract(body: dict[str, Any], attempt: int):
    """One failure mode per early request (by seed), good rows otherwise."""
    i, filled = body["seed"] - 13 * 100_000, filled_of(body)
    if i == 0:  # asked for `product`: the value is not in the text
        return 200, {}, extract_examples([("has the food processor shipped", "blender", None), ("has the microwave shipped yet", "microwave", None)])
    if i == 1:
        return 200, {}, json.dumps({"examples": [{"text": "where is my lamp", "output": {"product": "lamp"}}]})
    if i == 3:  # asked for `product + problem`: problem left null; and a copy of a real row
        assert filled == "product + problem"
        return 200, {}, extract_examples([("is the heater in stock", "heater", None),
                                          ("my blender arrived with a cracked lid", "blender", "cracked lid")])
    return good_extract_answer(body, attempt)


def scripted_generate(body: dict[str, Any], attempt: int):
    i = body["seed"] - 13 * 100_000
    if i == 0:  # a real row's target for a new text (an echo of the input fails target_length first)
        return 200, {}, json.dumps({"examples": [{"text": "i changed my mind about the bookcase and no longer want it delivered to me",
                                                  "target": "wants bookshelf order cancelled"}]})
    if i == 1:
        return 200, {}, json.dumps({"examples": [{"text": "the oven door does not close properly since the engineer came round",
                                                  "target": " ".join(["the oven door will not close after the visit"] * 4)}]})
    return good_generate_answer(body, attempt)


def rows_of(folder: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["extract", "generate"])
def test_microtune_synth_writes_rows_train_accepts(kind: str, make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    factory, answer = (extract_recipe_factory, scripted_extract) if kind == "extract" else (generate_recipe_factory, scripted_generate)
    ws = tmp_path / "ws"
    with FakeTeacher(answer) as teacher:
        recipe = factory(make_recipe, tiny_model_dir, tmp_path)(teacher.url)
        result = CliRunner().invoke(app, ["synth", str(recipe), "-w", str(ws)])
    assert result.exit_code == 0, result.output
    assert all(n_of(h["body"]) <= 2 for h in teacher.hits) and "fidelity" in result.output
    folder = next((ws / "toy" / "synthetic").iterdir())
    m, accepted, rejected = json.loads((folder / "manifest.json").read_text()), rows_of(folder, "accepted.jsonl"), rows_of(folder, "rejected.jsonl")
    assert 0 < m["accepted"] == len(accepted) <= 6 and m["plan"]["requests"] == len(teacher.hits)
    # every accepted row is an example of the task, as `check` would make it from a row with these keys
    task_cfg = load_recipe(recipe).task
    for row in accepted:
        raw = {"text": row["text"], "target": row["output"] if kind == "extract" else row["target"]}
        example, problems = get_task(task_cfg).normalize(raw, task_cfg)
        assert problems == [] and all(row[k] == v for k, v in example.items()), row
        assert row["provenance"]["teacher"] == "fake-teacher" and "p_synthetic" in row["scores"] and "label" not in row
    got = {r["reason"] for r in rejected}
    if kind == "extract":
        assert {"grounding", "schema", "stratum", "copy"} <= got
        assert {r["detail"] for r in rejected if r["reason"] == "stratum"} == {"asked for filled fields 'product + problem', got 'product'"}
        assert set(m["accepted_per_stratum"]) <= {"product", "product + problem"} and m["plan"]["strata"] == "filled fields"
        assert all(r["scores"]["grounded_values"] >= 1 for r in accepted)
    else:
        assert {"target_copy", "target_length"} <= got and m["accepted_per_stratum"] == {"all": len(accepted)}
    report = json.loads((folder / "fidelity.json").read_text())
    assert report["two_sample"]["auc"] is not None and report["distribution"]["length_ks"] is not None and "strata" in report
    assert m["filters"]["schema"]["entered"] > 0 and m["filters"]["near_duplicate"]["entered"] > 0
    # train mixes them in: the rows are the task's examples
    rows, info = synthetic_for_training(load_recipe(recipe, ["synth.mix.enabled=true"]), ws / "toy" / "synthetic", m["dataset_hash"], 12)
    assert len(rows) == min(len(accepted), 12) and {"text", "source"} <= set(rows[0]) and "scores" not in rows[0]
    adapter = train(recipe, ["synth.mix.enabled=true", "train.epochs=1", "train.max_seq_len=128"], ws)
    assert json.loads((adapter / "manifest.json").read_text())["synthetic"]["used"] == len(rows)


@pytest.mark.slow
def test_per_label_on_a_generate_recipe_exits_2_before_any_request(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    with FakeTeacher(good_generate_answer) as teacher:
        recipe = generate_recipe_factory(make_recipe, tiny_model_dir, tmp_path)(teacher.url, total=None, per_label=4)
        result = CliRunner().invoke(app, ["synth", str(recipe), "-w", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "synth.per_label asks for rows per label" in result.output and "synth.total" in result.output
    assert teacher.hits == []


@pytest.mark.slow
def test_synth_with_the_local_teacher_on_an_extract_recipe(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`base_url: local` (tuned for two steps): the request format is learnt from real extract rows, then the stage runs as usual."""
    recipe = extract_recipe_factory(make_recipe, tiny_model_dir, tmp_path)("local", teacher={"max_tokens": 24, "tune_steps": 2})
    folder = synth(recipe, workspace=tmp_path / "ws")
    m = json.loads((folder / "manifest.json").read_text())
    assert m["teacher"]["base_url"].startswith("http://127.0.0.1:") and m["usage"]["sent"] == m["plan"]["requests"] > 0
    assert m["accepted"] + m["rejected"] > 0
    tuned = next((tmp_path / "ws" / "toy" / "teacher").iterdir())
    taught = [json.loads(line) for line in (tuned / "train.jsonl").read_text().splitlines()]
    assert taught and all(set(json.loads(r["target"])["examples"][0]) == {"text", "output"} for r in taught)
