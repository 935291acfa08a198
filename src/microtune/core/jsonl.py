"""JSON Lines (one JSON object per line): read with line numbers, written whole.

    rows = read_jsonl(folder / "predictions.jsonl")                 # a bad line raises DataError with file:line
    for line, row in iter_jsonl(path, on_error=report): ...        # a bad line is reported, reading goes on
    write_jsonl(folder / "train.jsonl", rows)                       # atomically, UTF-8, one object per line

Lines are split on ``\\n`` only (never on the Unicode line separators ``str.splitlines`` also splits on,
which ``json.dumps(..., ensure_ascii=False)`` leaves inside strings), and blank lines are skipped. The
problem messages are the user-facing ones of `microtune check`: they name the column and the fix.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from microtune.core.atomic import atomic_file
from microtune.core.errors import DataError

BOM = b"\xef\xbb\xbf"
OnError = Callable[[int, str, Any], None]
"""Called with ``(line number, what is wrong, what the line held or None)`` for every unreadable line."""


def numbered_lines(path: str | Path, on_error: OnError) -> Iterator[tuple[int, str]]:
    """Every line of the file as text (line ending kept) with its 1-based number; a line that is not UTF-8 goes to ``on_error``."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(BOM)  # editors (Excel, Notepad) start UTF-8 files with a byte-order mark
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                on_error(number, f"not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1}); "
                         "re-save the file as UTF-8", None)


def iter_jsonl(path: str | Path, on_error: OnError | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; a line that is not a JSON object goes to ``on_error``
    (default: raise DataError naming ``file:line``)."""
    report = on_error or _raiser(path)
    for number, text in numbered_lines(path, report):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            report(number, f"not valid JSON ({exc.msg} at column {exc.colno})", text.strip())
            continue
        if not isinstance(obj, dict):
            report(number, f"a JSONL row must be a JSON object, not {type(obj).__name__}", obj)
            continue
        yield number, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every object of a JSONL file microtune wrote; a damaged line is a DataError with ``file:line``."""
    return [obj for _, obj in iter_jsonl(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """One object per line, non-ASCII text kept as is, written atomically (readers never see half a file)."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _raiser(path: str | Path) -> OnError:
    def fail(number: int, message: str, got: Any) -> None:
        shown = f" (got {str(got)[:80]!r})" if got is not None else ""
        raise DataError(f"{path}:{number}: {message}{shown}",
                        hint="the file is damaged: rerun the stage that wrote it, or fix that line (one JSON object per line)")

    return fail
