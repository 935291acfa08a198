"""`microtune predict`: a trained micro-model answers a file's rows through eval's decoder (the same label and probability
eval gives), found by folder or registry reference; bad rows stop it with file:line and nothing written, unless
--skip-bad; the output is JSONL, CSV or Parquet by extension and is written whole or not at all."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.core.errors import DataError, InputError
from microtune.registry.models import parse_reference
from toydata import EXTRACT_FIELDS, EXTRACT_ROWS, LABELS, TEXTS, extract_row, write_jsonl

runner = CliRunner()


def _recipe(folder: Path, base: Path, task: dict[str, Any], train: dict[str, Any], test: list[dict[str, Any]]) -> Path:
    import yaml

    write_jsonl(folder / "test.jsonl", test)
    recipe = {"name": task.pop("name"), "task": task, "model": {"base": str(base)},
              "data": {"train": "train.jsonl", "test": "test.jsonl", "split": {"valid": 0.0}},
              "train": {"batch_size": 4, "max_seq_len": 128, "lr": 2e-3, **train}, "eval": {"baselines": [], "batch_size": 4}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "recipe.yaml"


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """check → train → eval → register → gate of the toy intents: version 1, the champion."""
    from microtune import pipeline
    from toydata import toy_rows

    folder = tmp_path_factory.mktemp("predict")
    write_jsonl(folder / "train.jsonl", toy_rows(5))
    test = [{"text": TEXTS[label][i], "label": label} for label in LABELS for i in (6, 7)]
    recipe = _recipe(folder, tiny_model_dir, {"name": "toy", "instruction": "Route the customer message.", "labels": LABELS},
                     {"epochs": 2}, test)
    result = pipeline.run(recipe, workspace=folder / "ws")
    assert result.model_version == "1" and result.decision.verdict == "promote"
    return folder, result


@pytest.fixture(scope="module")
def extract_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from microtune import pipeline

    folder = tmp_path_factory.mktemp("predict-extract")
    rows = [extract_row(*r) for r in EXTRACT_ROWS]
    write_jsonl(folder / "train.jsonl", rows[:12])
    recipe = _recipe(folder, tiny_model_dir, {"name": "products", "type": "extract", "instruction": "Name the product and its problem.",
                                              "fields": EXTRACT_FIELDS, "max_new_tokens": 32}, {"max_steps": 2}, rows[12:])
    return pipeline.train(recipe, workspace=folder / "ws")


def test_registry_references_parse_like_serve_names_them() -> None:
    assert parse_reference("toy") == ("toy", None, None)
    assert parse_reference("toy@champion") == ("toy", "champion", None)
    assert parse_reference("toy@v3") == ("toy", None, "3") == parse_reference("toy/3") == parse_reference("toy@V3")
    assert parse_reference("toy@version3") == ("toy", "version3", None)
    for bad in ("./adapters/run", "toy@", "toy/x", "-toy", "a/b/c", ""):
        assert parse_reference(bad) is None, bad


@pytest.mark.slow
def test_classify_answers_are_eval_s_labels_and_probabilities(classify_run: Any) -> None:
    from microtune import predict

    folder, result = classify_run
    source = folder / "new.jsonl"
    write_jsonl(source, [{"id": f"q{i}", "text": row["text"], "extra": [1, {"x": None}]}
                         for i, row in enumerate(json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines())])
    done = predict(result.adapter_dir, source, folder / "answers.jsonl")
    assert (done.rows, done.rejected, done.rejects, done.version) == (6, 0, None, None)
    answers = [json.loads(line) for line in done.output.read_text().splitlines()]
    by_text = {e["text"]: e["micro"] for e in map(json.loads, (result.eval_dir / "predictions.jsonl").read_text().splitlines())}
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()]
    assert [a["source"] for a in answers] == [f"{source}:{i}" for i in range(1, 7)]
    assert list(answers[0]) == ["source", "id", "answer", "prob", "cut", "error"] and answers[0]["id"] == "q0"
    assert [a["answer"] for a in answers] == [by_text[t]["pred"] for t in texts]
    assert [a["prob"] for a in answers] == pytest.approx([by_text[t]["prob"] for t in texts], abs=2e-4)
    assert all(a["answer"] in LABELS and 0 < a["prob"] <= 1 and a["cut"] is False and a["error"] is None for a in answers)


@pytest.mark.slow
def test_a_registered_model_by_alias_version_or_name(classify_run: Any) -> None:
    from microtune import predict

    folder, result = classify_run
    source = write_jsonl(folder / "few.jsonl", [{"text": TEXTS["refund"][0]}, {"text": TEXTS["billing"][1]}])
    by_folder = predict(result.adapter_dir, source, folder / "by-folder.csv")
    rows = list(csv.DictReader(by_folder.output.open(encoding="utf-8")))
    assert [r["source"] for r in rows] == [f"{source}:1", f"{source}:2"] and "id" not in rows[0]  # no ids in, no id column
    for ref in ("toy@champion", "toy@v1", "toy/1", "toy"):
        found = predict(ref, source, folder / f"by-{ref.replace('/', '-')}.csv", workspace=folder / "ws")
        assert found.version == "1" and found.output.read_text() == by_folder.output.read_text(), ref
    result_cli = runner.invoke(app, ["predict", "toy@champion", "-i", str(source), "-o", str(folder / "cli.jsonl"), "-w", str(folder / "ws")])
    assert result_cli.exit_code == 0, result_cli.output
    assert f"answered 2 row(s) with toy@champion (version 1): {folder / 'cli.jsonl'}" in result_cli.output
    with pytest.raises(InputError, match="model 'toy' has no alias 'staging'") as info:
        predict("toy@staging", source, folder / "x.jsonl", workspace=folder / "ws")
    assert "aliases: champion" in info.value.hint
    with pytest.raises(InputError, match="no registered model named 'nosuch'"):
        predict("nosuch@champion", source, folder / "x.jsonl", workspace=folder / "ws")
    assert not (folder / "x.jsonl").exists()


@pytest.mark.slow
def test_a_bad_row_stops_with_file_line_and_writes_nothing_unless_skip_bad(classify_run: Any) -> None:
    folder, result = classify_run
    source = folder / "mixed.jsonl"
    source.write_text("\n".join([json.dumps({"id": 1, "text": TEXTS["refund"][1]}), json.dumps({"id": 2, "body": "no text field"}),
                                 "{not json", json.dumps({"id": 4, "text": 42}), json.dumps({"id": 5, "text": TEXTS["shipping"][2]})]) + "\n")
    out = folder / "mixed-answers.parquet"
    args = ["predict", str(result.adapter_dir), "--input", str(source), "--output", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    for line in (f"{source}:2: missing field 'text'", f"{source}:3: not valid JSON", f"{source}:4: field 'text' is not a string (got 42)"):
        assert line in refused.output
    assert "3 input problem(s); nothing was written" in refused.output and "--skip-bad" in refused.output
    assert not out.exists() and not list(folder.glob("mixed-answers*"))
    skipped = runner.invoke(app, [*args, "--skip-bad"])
    assert skipped.exit_code == 0, skipped.output
    assert f"skipped: {source}:4: field 'text' is not a string (got 42)" in skipped.output and "skipped 3 bad row(s)" in skipped.output
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    assert [(r["source"], r["id"]) for r in table] == [(f"{source}:1", 1), (f"{source}:5", 5)]
    assert all(r["answer"] in LABELS and 0 < r["prob"] <= 1 for r in table)
    rejects = [json.loads(line) for line in (folder / "mixed-answers.parquet.rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": f"{source}:2", "problems": ["missing field 'text' (got \"keys ['body', 'id']\")"],
                       "row": {"id": 2, "body": "no text field"}},
                       {"source": f"{source}:3", "problems": ["not valid JSON (Expecting property name enclosed in double quotes at column 2) "
                                                              "(got '{not json')"]},
                       {"source": f"{source}:4", "problems": ["field 'text' is not a string (got 42)"], "row": {"id": 4, "text": 42}}]


@pytest.mark.slow
def test_parquet_input_rows_are_named_by_row_and_a_missing_file_cannot_be_skipped(classify_run: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from microtune import predict

    folder, result = classify_run
    pq.write_table(pa.Table.from_pylist([{"text": TEXTS["billing"][2]}, {"text": None}, {"text": TEXTS["refund"][3]}]), folder / "in.parquet")
    with pytest.raises(DataError) as info:
        predict(result.adapter_dir, folder / "in.parquet", folder / "p.jsonl")
    assert [str(p) for p in info.value.problems] == [f"{folder / 'in.parquet'}:row 1: field 'text' is not a string"]
    done = predict(result.adapter_dir, folder / "in.parquet", folder / "p.jsonl", skip_bad=True)
    assert [json.loads(line)["source"] for line in done.output.read_text().splitlines()] == \
           [f"{folder / 'in.parquet'}:row 0", f"{folder / 'in.parquet'}:row 2"]
    with pytest.raises(DataError, match="1 input problem") as missing:
        predict(result.adapter_dir, folder / "missing.jsonl", folder / "m.jsonl", skip_bad=True)
    assert str(missing.value.problems[0]) == f"{folder / 'missing.jsonl'}: data file not found" and not (folder / "m.jsonl").exists()


@pytest.mark.slow
def test_extract_answers_are_parsed_objects(extract_adapter: Path) -> None:
    from microtune import predict

    folder = extract_adapter.parents[3]
    source = write_jsonl(folder / "new.jsonl", [{"text": text} for text, _, _ in EXTRACT_ROWS[12:]])
    done = predict(extract_adapter, source, folder / "answers.jsonl", batch_size=2)
    answers = [json.loads(line) for line in done.output.read_text().splitlines()]
    assert len(answers) == 4 and list(answers[0]) == ["source", "answer", "raw", "cut", "error"]
    for a in answers:  # the JSON constraint makes even a 2-step model answer an object with exactly the task's fields
        assert list(a["answer"]) == list(EXTRACT_FIELDS) and a["error"] is None
        assert json.loads(a["raw"]).keys() == a["answer"].keys()


@pytest.mark.slow
def test_the_output_is_whole_or_absent(classify_run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process dying between writing and renaming leaves the old output as it was, and no half-written one."""
    from microtune import predict
    from microtune.core import atomic

    folder, result = classify_run
    source = write_jsonl(folder / "one.jsonl", [{"text": TEXTS["refund"][2]}])
    out = folder / "kept.jsonl"
    out.write_text("the previous answers\n")

    def die(point: str) -> None:
        if point == "atomic.file_before_rename":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(atomic, "reach", die)
    with pytest.raises(KeyboardInterrupt):
        predict(result.adapter_dir, source, out)
    assert out.read_text() == "the previous answers\n" and not list(folder.glob(".kept.jsonl.tmp-*"))


def test_wrong_outputs_and_models_are_refused_before_anything_loads(tmp_path: Path) -> None:
    from microtune import predict

    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    cases = [(("x", source, tmp_path / "out.txt"), "the answers are written as .jsonl, .csv, .parquet"),
             (("x", source, source), "is the input file"),
             (("x", source, tmp_path), "is a folder"),
             (("./no/such/adapter", source, tmp_path / "o.jsonl"), "is not an adapter folder (no such folder) nor a registered model name")]
    for args, message in cases:
        with pytest.raises(InputError, match=None) as info:
            predict(*args)
        assert message in info.value.message, (args, info.value.message)
    result = runner.invoke(app, ["predict", "./no/such/adapter", "-i", str(source), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "NAME@champion" in result.output
