"""Property tests: whatever bytes a data file or a recipe holds, microtune answers with its own error (exit 2 at the
CLI, with where and what) or with rows — never another exception."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microtune.config import load_recipe, validate_recipe
from microtune.core.errors import InputError
from microtune.data import build_dataset

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
row_like = st.dictionaries(st.sampled_from(["text", "label", "messages", "target", "x"]), json_values, max_size=4)


def _recipe(folder: Path, train: str, fmt: str = "auto") -> Path:
    spec = {"name": "fuzz", "task": {"instruction": "Sort it."}, "model": {"base": str(folder / "unused")},
            "data": {"train": train, "format": fmt, "split": {"valid": 0.0, "test": 0.0}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _build(folder: Path, name: str, content: bytes, fmt: str = "auto") -> None:
    (folder / name).write_bytes(content)
    try:
        build_dataset(load_recipe(_recipe(folder, name, fmt)))
    except InputError as exc:  # microtune's own errors carry where and what: every problem names the file (and line)
        assert str(exc)
        for problem in exc.problems:
            assert problem.where.startswith(str(folder / name)) or problem.where in ("labels", "train", "valid", "test"), problem


@FUZZ
@given(content=st.binary(max_size=300))
def test_random_bytes_as_jsonl_or_csv(tmp_path: Path, content: bytes) -> None:
    _build(tmp_path, "train.jsonl", content)
    _build(tmp_path, "train.csv", content)


@FUZZ
@given(rows=st.lists(row_like | json_values, max_size=8))
def test_random_json_values_as_jsonl_and_chat_rows(tmp_path: Path, rows: list) -> None:
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _build(tmp_path, "train.jsonl", content)
    _build(tmp_path, "chat.jsonl", content, fmt="openai_chat")


@FUZZ
@given(cells=st.lists(st.lists(st.text(max_size=12), min_size=0, max_size=4), max_size=8),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
def test_random_csv_shapes_and_encodings(tmp_path: Path, cells: list, encoding: str) -> None:
    lines = ["text,label", *(",".join(json.dumps(c) if "," in c or '"' in c else c for c in row) for row in cells)]
    try:
        content = "\n".join(lines).encode(encoding)
    except UnicodeEncodeError:
        return
    _build(tmp_path, "train.csv", content)


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(["name", "task", "data", "method", "train", "eval", "synth", "x"]), json_values, max_size=6))
def test_random_recipe_values(raw: dict) -> None:
    try:
        validate_recipe(raw)
    except InputError as exc:
        assert str(exc)


@FUZZ
@given(content=st.binary(max_size=200))
def test_random_bytes_as_a_recipe_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "r.yaml").write_bytes(content)
    try:
        load_recipe(tmp_path / "r.yaml")
    except InputError as exc:
        assert str(exc)


def test_what_the_fuzzing_found_exits_2_at_the_cli(tmp_path: Path) -> None:
    """Two inputs that used to end in a traceback: a bare carriage return inside an unquoted CSV cell (csv.Error) and a
    recipe file that is not UTF-8 (UnicodeDecodeError)."""
    from typer.testing import CliRunner

    from microtune.cli import app

    (tmp_path / "train.csv").write_bytes(b"text,label\nhello\rthere,billing\n")
    bad_csv = CliRunner().invoke(app, ["check", str(_recipe(tmp_path, "train.csv")), "-w", str(tmp_path / "ws")])
    assert bad_csv.exit_code == 2 and f"{tmp_path / 'train.csv'}:" in bad_csv.output and "Traceback" not in bad_csv.output
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    bad_recipe = CliRunner().invoke(app, ["check", str(tmp_path / "latin.yaml"), "-w", str(tmp_path / "ws")])
    assert bad_recipe.exit_code == 2 and "not UTF-8 text" in bad_recipe.output and "save the recipe as UTF-8" in bad_recipe.output
    assert not (tmp_path / "ws").exists() or not list((tmp_path / "ws").rglob("manifest.json"))
