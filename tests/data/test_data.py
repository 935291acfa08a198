"""Data checks: every bad row reported as file:line with what came in; exit 2; nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.config import load_recipe
from microtune.core.errors import DataError
from microtune.data import build_dataset
from toydata import LABELS, toy_rows, write_jsonl

runner = CliRunner()


def _check(recipe: Path, workspace: Path):
    return runner.invoke(app, ["check", str(recipe), "--workspace", str(workspace)])


def _problems(recipe: Path) -> str:
    """Every data error goes through the CLI: exit code 2, the problems on stderr, no artifact."""
    with pytest.raises(DataError) as info:
        build_dataset(load_recipe(recipe))
    result = _check(recipe, recipe.parent / "ws")
    assert result.exit_code == 2
    assert not list((recipe.parent / "ws").glob("*/datasets/*"))
    for problem in info.value.problems:
        assert str(problem) in result.output
    return str(info.value)


def test_every_bad_row_reported_with_file_line(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    train = tmp_path / "train.jsonl"
    good = [json.dumps(r) for r in toy_rows(3)]
    train.write_bytes("\n".join([
        good[0],
        "{not json",
        "[1, 2]",
        json.dumps({"label": "billing"}),
        json.dumps({"text": 42, "label": "billing"}),
        json.dumps({"text": "   ", "label": "billing"}),
        json.dumps({"text": "hello there", "label": "biling"}),
        *good[1:],
    ]).encode() + b"\n\xff\xfe broken bytes\n")
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.3}})
    result = _check(recipe, tmp_path / "ws")
    assert result.exit_code == 2, result.output
    out = result.output
    assert f"{train}:2: not valid JSON" in out and "(got '{not json')" in out
    assert f"{train}:3: a JSONL row must be a JSON object, not list (got [1, 2])" in out
    assert f"{train}:4: missing field 'text'" in out
    assert f"{train}:5: field 'text' is not a string (got 42)" in out
    assert f"{train}:6: field 'text' is empty" in out
    assert f"{train}:16: not UTF-8 text" in out
    assert "7 data problem(s); nothing was written" in out
    assert not (tmp_path / "ws" / "toy" / "datasets").exists() or not any((tmp_path / "ws" / "toy" / "datasets").iterdir())


def test_label_outside_declared_set_names_nearest(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [*toy_rows(3), {"text": "hello there", "label": "biling"}])
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.3}})
    assert f"{tmp_path / 'train.jsonl'}:10: label not in task.labels (nearest: 'billing') (got 'biling')" in _problems(recipe)


def test_missing_and_empty_files(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    recipe = make_recipe(tiny_model_dir, data={"train": "missing.jsonl", "test": "empty.jsonl"})
    text = _problems(recipe)
    assert f"{tmp_path / 'missing.jsonl'}: data file not found" in text
    assert f"{tmp_path / 'empty.jsonl'}:1: data file is empty" in text


def test_train_test_overlap_is_an_error_after_normalisation(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", toy_rows(4))
    write_jsonl(tmp_path / "test.jsonl", [{"text": "  WHERE is my   parcel ", "label": "shipping"}])
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "test": "test.jsonl"})
    result = _check(recipe, tmp_path / "ws")
    assert result.exit_code == 2
    assert f"{tmp_path / 'test.jsonl'}:1: test row also in train at {tmp_path / 'train.jsonl'}:2 (leakage)" in result.output


def test_warnings_do_not_block(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    rows = toy_rows(4) + [{"text": f"charge number {i}", "label": "billing"} for i in range(20)]
    rows.append(dict(rows[0]))  # a duplicate
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a question nobody asked", "label": "other"}])
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "test": "test.jsonl"},
                         task={"labels": None})
    result = _check(recipe, tmp_path / "ws")
    assert result.exit_code == 0, result.output
    assert "duplicate text within train" in result.output
    assert "label(s) in test never appear in train" in result.output
    assert "label 'billing' is 7" in result.output and "always answering it scores" in result.output
    assert list((tmp_path / "ws" / "toy" / "datasets").glob("*/train.jsonl"))


def test_csv_and_openai_chat_formats(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    rows = toy_rows(4)
    csv_lines = ["text,label", *[f"\"{r['text']}\",{r['label']}" for r in rows]]
    (tmp_path / "train.csv").write_text("\n".join(csv_lines) + "\n")
    chat = [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": r["text"] + " now"},
                          {"role": "assistant", "content": r["label"]}]} for r in toy_rows(2, offset=5)]
    write_jsonl(tmp_path / "test.jsonl", chat)
    recipe = load_recipe(make_recipe(tiny_model_dir, data={"train": "train.csv", "test": "test.jsonl"}))
    result = build_dataset(recipe)
    assert sorted(result.labels) == sorted(LABELS)
    assert result.sources["train"]["format"] == "csv" and result.sources["test"]["format"] == "openai_chat"
    first = {"text": rows[0]["text"], "label": rows[0]["label"], "source": f"{tmp_path / 'train.csv'}:2"}
    assert first in result.splits["train"] + result.splits["valid"]
    assert all(e["text"].endswith(" now") for e in result.splits["test"])


def test_csv_ragged_row(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhello,billing\ntoo,many,cells\n")
    recipe = make_recipe(tiny_model_dir, data={"train": "train.csv", "split": {"valid": 0, "test": 0}})
    assert f"{tmp_path / 'train.csv'}:3: more cells than header columns" in _problems(recipe)


def test_chat_row_without_assistant(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "format": "openai_chat"})
    assert f"{tmp_path / 'train.jsonl'}:1: a chat row needs a user and an assistant message" in _problems(recipe)


def test_split_is_stratified_and_seeded(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"{label} message {i}", "label": label} for label in LABELS for i in range(10)])
    recipe = load_recipe(make_recipe(tiny_model_dir, data={"train": "train.jsonl", "split": {"valid": 0.1, "test": 0.2, "seed": 1}}))
    a, b = build_dataset(recipe), build_dataset(recipe)
    assert a.splits == b.splits
    for label in LABELS:
        assert sum(e["label"] == label for e in a.splits["test"]) == 2
        assert sum(e["label"] == label for e in a.splits["valid"]) == 1
    assert len(a.splits["train"]) == 21


def test_check_report_and_artifact(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    result = _check(make_recipe(tiny_model_dir), tmp_path / "ws")
    assert result.exit_code == 0, result.output
    assert "share receiving loss" in result.output
    folders = list((tmp_path / "ws" / "toy" / "datasets").iterdir())
    assert len(folders) == 1
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["kind"] == "dataset" and manifest["stats"]["rows"]["train"] == 15
    assert manifest["stats"]["train_tokens"]["p50"] > 10
    again = _check(make_recipe(tiny_model_dir), tmp_path / "ws")  # unchanged data: the same artifact
    assert again.exit_code == 0 and list((tmp_path / "ws" / "toy" / "datasets").iterdir()) == folders


def test_files_that_start_with_a_byte_order_mark_read_like_plain_utf8(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """Excel and Notepad save UTF-8 with a BOM; it used to turn the CSV header into '\\ufefftext' (every row: missing
    field 'text') and line 1 of a JSONL file into an error."""
    bom = "\ufeff"
    rows = toy_rows(4)
    csv_lines = ["text,label", *[f"\"{r['text']}\",{r['label']}" for r in rows]]
    (tmp_path / "train.csv").write_text(bom + "\n".join(csv_lines) + "\n", encoding="utf-8")
    chat = [{"messages": [{"role": "user", "content": r["text"] + " now"}, {"role": "assistant", "content": r["label"]}]}
            for r in toy_rows(2, offset=5)]
    (tmp_path / "test.jsonl").write_text(bom + "".join(json.dumps(c) + "\n" for c in chat), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in toy_rows(2, offset=9)), encoding="utf-8")
    recipe = load_recipe(make_recipe(tiny_model_dir, data={"train": "train.csv", "valid": "valid.jsonl", "test": "test.jsonl"}))
    result = build_dataset(recipe)
    assert result.sources["test"]["format"] == "openai_chat"  # detected through the BOM
    assert [e["text"] for e in result.splits["train"]] == [r["text"] for r in rows]
    assert len(result.splits["valid"]) == len(toy_rows(2, offset=9)) and len(result.splits["test"]) == len(chat)


def test_a_folder_given_as_a_data_file_is_named_as_a_folder(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    (tmp_path / "data").mkdir()
    recipe = make_recipe(tiny_model_dir, data={"train": "data"})
    assert f"{tmp_path / 'data'}: is a folder, not a data file: name a .jsonl or .csv file inside it" in _problems(recipe)


def test_inferred_labels_that_look_like_typos_of_frequent_ones_are_warned(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    rows = [*toy_rows(4), {"text": "my parcel never came", "label": "Shipping"}, {"text": "send my money back", "label": "refnd"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = make_recipe(tiny_model_dir, task={"labels": None}, data={"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.0}})
    warnings = [str(w) for w in build_dataset(load_recipe(recipe)).log.warnings]
    assert any("label 'Shipping' (1 row(s)) looks like a typo of 'shipping' (4 rows)" in w for w in warnings), warnings
    assert any("label 'refnd' (1 row(s)) looks like a typo of 'refund' (4 rows)" in w for w in warnings), warnings
    assert not any("'billing'" in w and "typo" in w for w in warnings)


def test_the_nearest_label_hint_is_the_same_in_every_process(tmp_path: Path) -> None:
    """A bad label equally near two declared labels: the hint used to follow set order, which differs per process."""
    import os
    import subprocess
    import sys

    code = ("from microtune.core.errors import ProblemLog\nfrom microtune.data.dataset import _check_labels\nlog = ProblemLog()\n"
            "_check_labels({'train': [{'label': 'ab', 'source': 'f:1'}], 'valid': [], 'test': []}, ['aa', 'bb', 'ax', 'xb'], True,"
            " lambda e: [e['label']], log)\nprint(log.errors[0])")
    src = str(Path(__file__).resolve().parents[2] / "src")
    hints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(hints) == 1 and "nearest: 'aa'" in hints.pop()


def test_rows_longer_than_max_seq_len_are_warned_and_measured_uncut(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """A row training will cut used to pass silently, and the token report was measured after the cut (it hid the row)."""
    from microtune import pipeline

    long_text = "the invoice shows a charge I do not recognise " * 60  # ~600 tokens
    write_jsonl(tmp_path / "train.jsonl", [*toy_rows(4), {"text": long_text, "label": "billing"}])
    recipe = make_recipe(tiny_model_dir, train={"max_seq_len": 64}, data={"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.0}})
    checked = pipeline.check(recipe, workspace=tmp_path / "ws")
    stats = checked.manifest["stats"]
    assert stats["train_tokens"]["max"] > 500 and stats["over_max_seq_len"]["rows"] == 1
    (warning,) = [w for w in checked.warnings if "longer than train.max_seq_len" in w]
    assert warning.startswith("train: 1 row(s) longer than train.max_seq_len=64 tokens (longest ")
    assert f"{tmp_path / 'train.jsonl'}:13" in warning  # which row
    result = _check(recipe, tmp_path / "ws2")
    assert result.exit_code == 0 and "longer than train.max_seq_len=64" in result.output


def test_a_nul_character_is_refused_whether_raw_or_escaped(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*toy_rows(3), {"text": "hello\u0000world", "label": "billing"}])
    assert "\\u0000" in path.read_text()  # json.dumps writes the escape
    with path.open("ab") as f:
        f.write(b'{"text": "raw\x00nul", "label": "billing"}\n')
    recipe = make_recipe(tiny_model_dir, data={"train": "train.jsonl", "split": {"valid": 0.0, "test": 0.3}})
    text = _problems(recipe)
    assert f"{tmp_path / 'train.jsonl'}:10: field 'text' contains a NUL character (\\u0000): remove it" in text
    assert f"{tmp_path / 'train.jsonl'}:11:" in text  # the raw byte: not valid JSON text
