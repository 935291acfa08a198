"""The shared folds in ``microtune.core`` and their one-rule users: atomic writes, JSON Lines, the model-name
pattern, the MLflow store URI rule, and the `serve` options read from ServeSettings."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.core.atomic import atomic_dir, atomic_file, read_json, write_bytes, write_json, write_text
from microtune.core.errors import DataError, InputError
from microtune.core.jsonl import iter_jsonl, read_jsonl, write_jsonl
from microtune.core.names import NAME_PATTERN, is_valid_name
from microtune.core.workspace import Workspace


# -- atomic writes -------------------------------------------------------------------------------
def test_atomic_writes_replace_the_whole_file_and_leave_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "out.json"
    write_json(target, {"b": 1, "a": [Path("x")], "é": "ü"})
    assert target.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": [\n    "x"\n  ],\n  "\\u00e9": "\\u00fc"\n}\n'
    write_json(target, {"é": "ü"}, ensure_ascii=False)
    assert read_json(target) == {"é": "ü"} and "ü" in target.read_text(encoding="utf-8")
    write_text(tmp_path / "page.html", "<p>ok</p>\n")
    write_bytes(tmp_path / "plot.png", b"\x89PNG")
    assert (tmp_path / "page.html").read_text() == "<p>ok</p>\n" and (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["out.json", "page.html", "plot.png"]


def test_a_failed_atomic_write_keeps_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="crash"), atomic_file(target) as f:
        f.write('{"new": ')
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(ValueError, match="mode"), atomic_file(target, "a"):
        pass


def test_atomic_dir_swaps_a_folder_whole_or_leaves_the_old_one(tmp_path: Path) -> None:
    dest = tmp_path / "artifact"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("first")
    with atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("second")
    assert [p.name for p in dest.iterdir()] == ["b.txt"]
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("crash")
    with pytest.raises(OSError), atomic_dir(dest, replace=False) as tmp:  # someone else made it first: theirs stays
        (tmp / "d.txt").write_text("late")
    assert [p.name for p in dest.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["artifact"]


# -- JSON Lines ----------------------------------------------------------------------------------
def test_jsonl_round_trip_keeps_text_and_splits_only_on_newlines(tmp_path: Path) -> None:
    rows = [{"text": "line\u2028separator and ünïcode", "n": 1}, {"text": "second", "n": 2}]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, iter(rows))
    assert path.read_text(encoding="utf-8").count("\n") == 2 and "ü" in path.read_text(encoding="utf-8")
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")  # blank lines are skipped
    assert read_jsonl(path) == rows
    assert [n for n, _ in iter_jsonl(path)] == [1, 2]


def test_jsonl_reports_every_bad_line_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"ok": 1}\n{not json\n[1, 2]\n\n\xff{"x": 1}\n{"ok": 2}\n')
    seen: list[tuple[int, str, object]] = []
    good = list(iter_jsonl(path, on_error=lambda n, message, got: seen.append((n, message, got))))
    assert good == [(1, {"ok": 1}), (6, {"ok": 2})]
    assert [(n, message.split(" (")[0]) for n, message, _ in seen] == [
        (2, "not valid JSON"), (3, "a JSONL row must be a JSON object, not list"), (5, "not UTF-8 text")]
    assert seen[0][2] == "{not json" and seen[1][2] == [1, 2] and "column 1" in seen[2][1]
    with pytest.raises(DataError, match=rf"{path.name}:2: not valid JSON") as info:
        read_jsonl(path)
    assert info.value.exit_code == 2 and "rerun the stage" in (info.value.hint or "")


# -- one name pattern ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, ok", [("intents", True), ("a.b-c_9", True), ("x" * 64, True), ("x" * 65, False),
                                      ("-lead", False), ("has space", False), ("q'uote", False), ("a/b", False), ("", False)])
def test_every_model_name_check_is_the_same_rule(name: str, ok: bool) -> None:
    from pydantic import ValidationError

    from microtune.config import Recipe
    from microtune.serving import parse_adapter_options

    assert is_valid_name(name) is ok
    assert Recipe.model_fields["name"].metadata[0].pattern == NAME_PATTERN
    spec = {"name": name, "task": {"type": "classify", "instruction": "x"}, "data": {"train": "t.jsonl"}}
    if ok:
        assert Recipe.model_validate(spec).name == name and parse_adapter_options([f"{name}=folder"]) == {name: Path("folder")}
    else:
        with pytest.raises(ValidationError):
            Recipe.model_validate(spec)
        with pytest.raises(InputError):
            parse_adapter_options([f"{name}=folder"])


# -- the store URI rule --------------------------------------------------------------------------
def test_store_uri_is_explicit_then_environment_then_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from microtune.registry import tracking

    ws = Workspace(tmp_path)
    assert ws.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and ws.mlflow_db == tmp_path / "mlflow.db"
    monkeypatch.setattr(tracking, "_USER_URI", None)
    assert tracking.store_uri(ws) == ws.mlflow_uri and tracking.given_uri() is None
    assert tracking.store_uri(ws, "http://recipe:5000") == "http://recipe:5000"
    monkeypatch.setattr(tracking, "_USER_URI", "http://env:5000")
    assert tracking.store_uri(ws) == "http://env:5000" and tracking.store_uri(ws, "http://recipe:5000") == "http://recipe:5000"


def test_serve_without_a_store_does_not_create_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from microtune import serving
    from microtune.registry import tracking

    monkeypatch.setattr(tracking, "_USER_URI", None)
    assert serving._registry(serving.ServeSettings(workspace=tmp_path / "ws")) is None
    assert not (tmp_path / "ws").exists()


# -- serve options come from ServeSettings -------------------------------------------------------
def test_serve_options_take_their_defaults_and_bounds_from_serve_settings() -> None:
    import typer
    from typer.testing import CliRunner

    from microtune.cli import app
    from microtune.serving import ServeSettings

    fields = ServeSettings.model_fields
    options = {p.name: p for p in typer.main.get_command(app).commands["serve"].params}
    renamed = {"timeout": "timeout_s", "poll": "poll_s"}
    shared = {name: renamed.get(name, name) for name in options if renamed.get(name, name) in fields}
    assert set(shared) >= {"host", "port", "registry", "tracking_uri", "max_loaded", "max_batch", "batch_window_ms", "max_queue",
                           "max_tokens", "max_body_bytes", "timeout", "poll"}
    for option, field in shared.items():
        assert options[option].default == fields[field].default, option
    runner = CliRunner()
    for args, bound in ((["--port", "70000"], "65535"), (["--timeout", "0"], "0.001"), (["--max-body-bytes", "10"], "1024")):
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 2 and bound in result.output, args  # a usage error naming the bound, not a traceback


def test_atomic_dir_sweeps_what_a_dead_writer_left_and_keeps_a_live_one(tmp_path: Path) -> None:
    """kill -9 during a write leaves `.NAME.tmp-<pid>-…`; the next write of NAME removes it (no live process owns it)."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    stale = [tmp_path / f".run1.tmp-{dead_pid}-abc", tmp_path / f".run1.old-{dead_pid}-0a1b2c3d"]
    live = tmp_path / f".run1.tmp-{os.getpid()}-xyz"  # a writer that is still running (this test)
    other = tmp_path / f".run2.tmp-{dead_pid}-abc"  # another artifact's leftover: a rerun writes a new run's folder, never run2 again
    for folder in [*stale, live, other]:
        folder.mkdir()
    dead_file = tmp_path / f".metrics.json.tmp-{dead_pid}-0123456789ab"  # atomic_file's temp files carry the pid too
    dead_file.write_text("{")
    with atomic_dir(tmp_path / "run1") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert (tmp_path / "run1" / "manifest.json").is_file()
    assert not any(p.exists() for p in [*stale, other, dead_file]) and live.exists()
