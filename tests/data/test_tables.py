"""Data in from tables: Parquet files and Hugging Face datasets (a save_to_disk folder, a hub id) go through the same row
checks as JSONL, every bad row reported at ``where:row N`` (0-based, as ``ds[N]`` counts); check hashes the rows themselves."""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from microtune.cli import app
from microtune.config import HfSource, load_recipe
from microtune.core.errors import DataError, RecipeError
from microtune.data import build_dataset
from toydata import EXTRACT_FIELDS, EXTRACT_ROWS, LABELS, extract_row, toy_rows, write_jsonl

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _hf_dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)


def _save(folder: Path, **splits: list[dict[str, Any]]) -> Path:
    """A DatasetDict folder with the given splits, as `DatasetDict.save_to_disk` writes it."""
    import datasets

    datasets.DatasetDict({name: _hf_dataset(rows) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder


def _errors(recipe: Path) -> list[str]:
    with pytest.raises(DataError) as info:
        build_dataset(load_recipe(recipe))
    return [str(p) for p in info.value.problems]


def test_parquet_rows_check_like_jsonl_and_bad_rows_name_their_row(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    rows: list[dict[str, Any]] = [{**r, "when": datetime.datetime(2024, 5, 1, 12, 0)} for r in toy_rows(4)]
    rows[2] = {"text": None, "label": "billing", "when": None}  # a null cell, as JSONL's null
    rows[5] = {"text": "where is it", "label": "shiping", "when": None}
    train = _parquet(tmp_path / "train.parquet", rows)
    recipe = make_recipe(tiny_model_dir, data={"train": "train.parquet", "split": {"valid": 0.0, "test": 0.25}})
    result = runner.invoke(app, ["check", str(recipe), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert f"{train}:row 2: field 'text' is not a string" in result.output
    assert f"{train}:row 5: label not in task.labels (nearest: 'shipping') (got 'shiping')" in result.output
    assert "2 data problem(s); nothing was written" in result.output
    assert not (tmp_path / "ws" / "toy" / "datasets").exists()


def test_a_parquet_file_gives_the_dataset_its_jsonl_twin_gives(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune.core.hashing import hash_file

    rows = toy_rows(5)
    write_jsonl(tmp_path / "train.jsonl", rows)
    _parquet(tmp_path / "train.parquet", rows)
    split = {"valid": 0.2, "test": 0.2}
    from_jsonl = build_dataset(load_recipe(make_recipe(tiny_model_dir, data={"train": "train.jsonl", "split": split})))
    from_parquet = build_dataset(load_recipe(make_recipe(tiny_model_dir, data={"train": "train.parquet", "split": split})))
    strip = {name: [(e["text"], e["label"]) for e in examples] for name, examples in from_jsonl.splits.items()}
    assert {name: [(e["text"], e["label"]) for e in examples] for name, examples in from_parquet.splits.items()} == strip
    assert from_parquet.sources["train"] == {"path": str(tmp_path / "train.parquet"), "sha256": hash_file(tmp_path / "train.parquet"),
                                             "format": "parquet"}
    assert all(e["source"].startswith(f"{tmp_path / 'train.parquet'}:row ") for e in from_parquet.splits["train"])


def test_nested_struct_and_null_fields_of_extract_rows(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """An extract target stored as a Parquet struct (with a null field) reads as the object JSONL gives; a null target is
    reported like JSONL's null."""
    rows = [extract_row(*r) for r in EXTRACT_ROWS]
    write_jsonl(tmp_path / "train.jsonl", rows)
    _parquet(tmp_path / "train.parquet", rows)
    task = {"type": "extract", "fields": EXTRACT_FIELDS, "labels": None}
    split = {"valid": 0.0, "test": 0.0}
    as_jsonl = build_dataset(load_recipe(make_recipe(tiny_model_dir, task=task, data={"train": "train.jsonl", "split": split})))
    as_parquet = build_dataset(load_recipe(make_recipe(tiny_model_dir, task=task, data={"train": "train.parquet", "split": split})))
    assert [{k: v for k, v in e.items() if k != "source"} for e in as_parquet.splits["train"]] == \
           [{k: v for k, v in e.items() if k != "source"} for e in as_jsonl.splits["train"]]
    _parquet(tmp_path / "bad.parquet", [*rows[:3], {"text": "the kettle leaks", "target": None}])
    problems = _errors(make_recipe(tiny_model_dir, task=task, data={"train": "bad.parquet", "split": split}))
    assert [p.split(": ", 1)[0] for p in problems] == [f"{tmp_path / 'bad.parquet'}:row 3"]


def test_an_unreadable_parquet_file_is_one_problem(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet at all")
    problems = _errors(make_recipe(tiny_model_dir, data={"train": "train.parquet"}))
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'train.parquet'}: not a readable Parquet file")


def test_a_text_format_named_for_a_parquet_source_is_refused(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    _save(tmp_path / "ds", train=toy_rows(3))
    problems = _errors(make_recipe(tiny_model_dir, data={"train": {"hf": "ds", "split": "train"}, "format": "csv"}))
    assert problems == [f"{tmp_path / 'ds'}[train]: data.format csv reads text files; this is a table (Parquet or a Hugging Face "
                        "dataset): set data.format to auto (or openai_chat for a `messages` column) (got 'csv')"]


def test_a_save_to_disk_folder_by_split_or_by_path(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    bad = [*toy_rows(2, offset=6), {"text": "hello", "label": "other"}, {"text": None, "label": "refund"}]
    _save(tmp_path / "ds", train=toy_rows(4), test=bad)
    _hf_dataset(toy_rows(1, offset=5)).save_to_disk(str(tmp_path / "valid-ds"))  # a single Dataset: a plain path works
    recipe = make_recipe(tiny_model_dir, data={"train": {"hf": "ds", "split": "train"}, "valid": "valid-ds",
                                               "test": {"hf": "ds", "split": "test"}})
    assert _errors(recipe) == [f"{tmp_path / 'ds'}[test]:row 7: field 'text' is not a string",  # row checks, then label checks
                               f"{tmp_path / 'ds'}[test]:row 6: label not in task.labels (nearest: 'refund') (got 'other')"]
    _save(tmp_path / "ds", train=toy_rows(4), test=toy_rows(2, offset=6))
    result = build_dataset(load_recipe(recipe))
    assert [len(result.splits[s]) for s in ("train", "valid", "test")] == [12, 3, 6]
    assert result.splits["test"][0]["source"].startswith(f"{tmp_path / 'ds'}[test]:row ")
    assert result.sources["train"] == {"hf": str(tmp_path / "ds"), "split": "train", "sha256": result.sources["train"]["sha256"],
                                       "format": "hf", "rows": 12}
    assert result.sources["valid"]["hf"] == str(tmp_path / "valid-ds") and "split" not in result.sources["valid"]


def test_the_dataset_hash_covers_the_rows_of_a_dataset_folder(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    _save(tmp_path / "ds", train=toy_rows(4))
    recipe = make_recipe(tiny_model_dir, data={"train": {"hf": "ds", "split": "train"}, "split": {"valid": 0.0, "test": 0.25}})
    first, again = build_dataset(load_recipe(recipe)), build_dataset(load_recipe(recipe))
    assert first.key == again.key
    changed = toy_rows(4)
    changed[0] = {**changed[0], "text": "my card was charged three times"}
    _save(tmp_path / "ds", train=changed)  # the same folder name, other rows
    assert build_dataset(load_recipe(recipe)).key != first.key


def test_folder_mistakes_are_reported_with_the_fix(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    _save(tmp_path / "ds", train=toy_rows(3), test=toy_rows(1, offset=6))
    where = tmp_path / "ds"
    cases = {
        "ds": f"{where}: a DatasetDict folder with the splits train, test: name one, e.g. {{hf: {where}, split: train}}",
        "{hf: ds}": f"{where}: a DatasetDict folder with the splits train, test: name one, e.g. {{hf: {where}, split: train}}",
        "{hf: ds, split: valid}": f"{where}[valid]: no split 'valid' in this folder; it has train, test",
        f"{{hf: ds, split: train, revision: {COMMIT}}}": f"{where}[train]: revision apply to hub datasets only; this is a local "
                                                         "folder: remove them",
        "{hf: ./missing, split: train}": f"{tmp_path / 'missing'}[train]: dataset folder not found (a folder written by "
                                         "Dataset.save_to_disk, relative to the recipe)",
    }
    for value, expected in cases.items():
        recipe = make_recipe(tiny_model_dir, data={"train": "placeholder"})
        recipe.write_text(recipe.read_text().replace("train: placeholder", f"train: {value}"))
        assert _errors(recipe) == [expected], value


def test_a_hub_dataset_loads_by_id_split_and_revision_and_warns_unpinned(tmp_path: Path, make_recipe, tiny_model_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No network in tests: `datasets.load_dataset` is replaced by a stand-in that records what it was asked."""
    import datasets

    asked: list[dict[str, Any]] = []

    def load_dataset(path: str, **kwargs: Any) -> Any:
        asked.append({"path": path, **kwargs})
        return _hf_dataset(toy_rows(4))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = {"train": {"hf": "acme/support-intents", "split": "train", "revision": COMMIT, "subset": "en"}, "split": {"test": 0.25}}
    pinned = build_dataset(load_recipe(make_recipe(tiny_model_dir, data=data)))
    assert asked == [{"path": "acme/support-intents", "name": "en", "split": "train", "revision": COMMIT}]
    assert not pinned.log.warnings and pinned.sources["train"]["revision"] == COMMIT
    assert pinned.splits["train"][0]["source"].startswith(f"hf:acme/support-intents@{COMMIT}[train]:row ")
    for revision, said in ((None, "no revision"), ("main", "revision 'main' is a branch or tag, which can move")):
        data["train"] = {"hf": "acme/support-intents", "split": "train", "revision": revision}
        result = build_dataset(load_recipe(make_recipe(tiny_model_dir, data=data)))
        assert [str(w).split(": a later run")[0] for w in result.log.warnings] == \
               [f"hf:acme/support-intents{'@main' if revision else ''}[train]: {said}"]
        assert result.key == pinned.key  # the key is made of the rows read: the same rows, the same dataset
    data["train"] = {"hf": "acme/support-intents"}
    assert _errors(make_recipe(tiny_model_dir, data=data))[0].startswith("hf:acme/support-intents: a hub dataset needs `split:`")


def test_a_hub_failure_is_a_problem_not_a_traceback(tmp_path: Path, make_recipe, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(path: str, **kwargs: Any) -> Any:
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    problems = _errors(make_recipe(tiny_model_dir, data={"train": {"hf": "acme/x", "split": "train", "revision": COMMIT}}))
    assert len(problems) == 1 and problems[0].startswith(f"hf:acme/x@{COMMIT}[train]: could not load it from the Hugging Face hub "
                                                         "(ConnectionError: Couldn't reach 'acme/x' on the Hub)")


def test_without_the_datasets_package_the_error_names_the_extra(tmp_path: Path, make_recipe, tiny_model_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "ds", train=toy_rows(3))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    problems = _errors(make_recipe(tiny_model_dir, data={"train": {"hf": "ds", "split": "train"}}))
    assert problems == [f"{tmp_path / 'ds'}[train]: reading Hugging Face datasets needs the `datasets` package: "
                        "pip install 'microtune[hf]'"]


def test_recipe_keeps_hub_ids_resolves_folders_and_reports_bad_keys_at_their_line(tmp_path: Path, make_recipe,
                                                                                   tiny_model_dir: Path) -> None:
    (tmp_path / "local-ds").mkdir()
    recipe = load_recipe(make_recipe(tiny_model_dir, data={"train": {"hf": "acme/intents", "split": "train"},
                                                           "valid": {"hf": "local-ds", "split": "v"}, "test": {"hf": "./x/y"}}))
    assert recipe.data.train == HfSource(hf="acme/intents", split="train")
    assert recipe.data.valid.hf == str(tmp_path / "local-ds") and recipe.data.test.hf == str(tmp_path / "x" / "y")
    again = type(recipe).model_validate(json.loads(json.dumps(recipe.resolved())))  # as an artifact's recipe.json reads back
    assert again.data == recipe.data
    path = make_recipe(tiny_model_dir, data={"train": {"hf": "acme/intents", "splt": "train"}, "test": {"split": "test"}})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert "data.train.splt: unknown key 'splt'; did you mean 'split'?" in text and "data.test.hf: Field required" in text


def test_openai_chat_rows_in_parquet(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["label"]}]} for r in toy_rows(3)]
    rows.append({"messages": [{"role": "user", "content": "only a question"}]})
    _parquet(tmp_path / "chat.parquet", rows)
    problems = _errors(make_recipe(tiny_model_dir, data={"train": "chat.parquet"}))
    assert problems == [f"{tmp_path / 'chat.parquet'}:row 9: a chat row needs a user and an assistant message (got ['user'])"]
    result = build_dataset(load_recipe(make_recipe(tiny_model_dir, data={"train": "chat.parquet", "split": {"valid": 0, "test": 0}},
                                                   ))) if _parquet(tmp_path / "chat.parquet", rows[:-1]) else None
    assert sorted(result.labels) == sorted(LABELS) and result.sources["train"]["format"] == "parquet"
