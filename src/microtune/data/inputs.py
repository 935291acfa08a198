"""Rows to predict (`microtune predict`): any source the data readers take, each row needing only the task's input.

    inputs = read_inputs(TASKS[recipe.task.type], recipe.task, Path("new.parquet"), "auto", id_field="id")
    inputs.rows       # InputRow(where="new.parquet:row 0", example={"text": ...}, id=17), in file order
    inputs.rejects    # one per bad row: {"source": where, "problems": [...], "row": what came in}
    inputs.fatal      # problems with the source as a whole (missing, unreadable, no rows): never skippable

The same readers and the same every-problem report as `check`; only the answer field is not asked for. Which
part of a row is the input is the task type's ``normalize_input`` (the text under ``task.text_field`` by default).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune.core.errors import Problem, ProblemLog
from microtune.data.readers import STOPPED, detect_format, located_rows, readable
from microtune.tasks.base import normalize_input

_ROW_PLACE = re.compile(r":(?:row )?\d+$")  # file:17 or file:row 16 — a problem with one row, not with the whole source


@dataclass(frozen=True)
class InputRow:
    where: str  # file:line, or file:row N (0-based) for tables
    example: dict[str, Any]
    id: Any = None  # the row's `id_field` value, None when the row has none


@dataclass
class Inputs:
    rows: list[InputRow] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    fatal: list[Problem] = field(default_factory=list)
    has_ids: bool = False  # some row carries `id_field`: the answers get an `id` column

    @property
    def problems(self) -> list[Problem]:
        """Every problem, as `check` reports them: the source's own first, then each bad row's."""
        return [*self.fatal, *(Problem(r["source"], p) for r in self.rejects for p in r["problems"])]


def read_inputs(task_cls: Any, cfg: Any, source: Path, fmt: str = "auto", id_field: str = "id") -> Inputs:
    """Read ``source`` and keep each row's input; every bad row becomes a reject with all its problems."""
    log, out = ProblemLog(), Inputs()
    if not readable(source, log):
        out.fatal = log.errors
        return out
    normalize: Callable[..., Any] = getattr(task_cls, "normalize_input", normalize_input)  # a plugin by shape has the default
    chat_cfg = cfg.model_copy(update={"text_field": "text"})  # OpenAI chat rows: the reader puts the user turn under `text`
    raw: dict[str, Any] = {}
    if getattr(task_cls, "reads_chat_rows", False) and source.is_file() and detect_format(source, fmt) == "openai_chat":
        fmt = "jsonl"  # a type that reads OpenAI chat rows whole (`chat`) gets them as they are, not cut to {text, label}
    for where, row in located_rows(source, fmt, log):
        example, problems = normalize(row, chat_cfg if row.get("_chat") else cfg)
        for reason, got in problems:
            log.error(where, reason, got)
        if example is None:
            raw[where] = row
            continue
        out.has_ids = out.has_ids or id_field in row
        out.rows.append(InputRow(where, example, row.get(id_field)))
    _sort_problems(out, log, raw)
    if not out.rows and not out.fatal and not out.rejects:
        out.fatal.append(Problem(str(source), "no rows in file"))
    return out


def _sort_problems(out: Inputs, log: ProblemLog, raw: dict[str, Any]) -> None:
    """Problems at a row go to that row's reject (several problems of one row: one reject); the others are fatal, and so is
    a damaged place after which a reader stops (skipping it would silently drop every row after it)."""
    by_row: dict[str, list[str]] = defaultdict(list)
    for problem in log.errors:
        if _ROW_PLACE.search(problem.where) and not problem.message.startswith(STOPPED):
            by_row[problem.where].append(problem.message + (f" (got {problem.got})" if problem.got is not None else ""))
        else:
            out.fatal.append(problem)
    out.rejects = [{"source": where, "problems": problems, **({"row": raw[where]} if where in raw else {})}
                   for where, problems in by_row.items()]
