"""Read annotated rows from JSONL, CSV and OpenAI chat fine-tuning JSONL, keeping ``file:line``.

``read_rows(path, fmt, log)`` yields ``(line, row)`` for every readable row and records every
unreadable one in ``log`` (not UTF-8, not JSON, not an object, bad chat shape) instead of stopping
at the first, so a user sees all problems of a file at once.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microtune.core.errors import ProblemLog
from microtune.core.jsonl import BOM, OnError, iter_jsonl, numbered_lines

FORMATS = ("jsonl", "csv", "openai_chat")


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.removeprefix(BOM)
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return "jsonl"
                return "openai_chat" if isinstance(first, dict) and "messages" in first else "jsonl"
    return "jsonl"


def read_rows(path: Path, fmt: str, log: ProblemLog) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)``; problems go to ``log`` with ``file:line``."""
    fmt = detect_format(path, fmt)
    if fmt == "csv":
        yield from _csv_rows(path, log)
        return
    for line, obj in iter_jsonl(path, _at(path, log)):
        if fmt == "openai_chat":
            row = _chat_row(obj, f"{path}:{line}", log)
            if row is not None:
                yield line, row
        else:
            yield line, obj


def _at(path: Path, log: ProblemLog) -> OnError:
    """Report a bad line into ``log`` as ``file:line`` (reading goes on, so every problem shows at once)."""
    return lambda number, message, got: log.error(f"{path}:{number}", message, got)


def _csv_rows(path: Path, log: ProblemLog) -> Iterator[tuple[int, dict[str, Any]]]:
    lines = [text for _, text in numbered_lines(path, _at(path, log))]
    if len(log.errors):
        return
    reader = csv.DictReader(io.StringIO("".join(lines), newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    start = 2  # first data row follows the header line
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a bare carriage return inside an unquoted cell, a NUL byte
            log.error(f"{path}:{reader.line_num or 1}", f"not a readable CSV row ({exc}); quote the cell or remove the character", None)
            return
        if None in row:
            log.error(f"{path}:{start}", "more cells than header columns", row[None])
        elif any(v is None for v in row.values()):
            log.error(f"{path}:{start}", "fewer cells than header columns", list(row.values()))
        else:
            yield start, dict(row)
        start = reader.line_num + 1


def _chat_row(obj: dict[str, Any], where: str, log: ProblemLog) -> dict[str, Any] | None:
    """OpenAI chat fine-tuning row: last user message = text, last assistant message = label."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        log.error(where, "`messages` must be a list of {role, content} objects", obj.get("messages"))
        return None
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    answers = [m.get("content") for m in messages if m.get("role") == "assistant"]
    if not users or not answers:
        log.error(where, "a chat row needs a user and an assistant message", [m.get("role") for m in messages])
        return None
    return {"text": users[-1], "label": answers[-1], "_chat": True}
