"""The predict step: a trained micro-model answers every row of a file (`microtune predict`).

    result = predict("intents@champion", "new.parquet", "answers.jsonl")            # a registered model
    result = predict(".microtune/intents/adapters/RUN", "new.csv", "answers.parquet", skip_bad=True)

MODEL is an adapter folder or a registry reference (``name``, ``name@alias``, ``name@v3``, ``name/3``: the champion,
else the newest version, for a bare name — as `microtune serve` resolves them). The input goes through the data
readers (JSONL, CSV, Parquet, a ``save_to_disk`` folder) and needs only the task's input field. Answers come from
eval's micro system (same prompt, same decoder: a label trie with the label's probability for classify, the
JSON-constrained generator for extract). A bad row stops the step before the model loads, every one reported at its
``file:line``, and nothing is written — unless ``skip_bad``: then the other rows are answered and the bad ones go to
``<output>.rejects.jsonl``. Files are written whole or not at all (``core.atomic``), the rejects first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microtune.config import artifact_recipe
from microtune.core.artifacts import read_manifest
from microtune.core.errors import DataError, InputError
from microtune.core.jsonl import write_jsonl
from microtune.core.progress import Reporter
from microtune.data.inputs import InputRow, Inputs, read_inputs
from microtune.data.readers import FORMATS as READERS
from microtune.data.writers import SUFFIXES, write_rows
from microtune.evaluation import Answer, predict_examples
from microtune.models import resolve_base
from microtune.pipeline.versions import registry_at
from microtune.registry import models as registry
from microtune.tasks import TASKS, get_task

FORMATS = ("auto", *READERS)  # the input formats: those of data.format


@dataclass(frozen=True)
class PredictResult:
    output: Path
    rows: int  # rows answered
    rejected: int  # bad rows skipped (with skip_bad)
    rejects: Path | None  # where they were written (with skip_bad)
    adapter_dir: Path
    version: str | None  # the registry version MODEL named; None for a folder


def predict(model: str | Path, input: str | Path, output: str | Path, *, workspace: str | Path | None = None,
            skip_bad: bool = False, id_field: str = "id", input_format: str = "auto", batch_size: int | None = None,
            reporter: Reporter | None = None) -> PredictResult:
    """Answer every row of ``input`` with the micro-model ``model``; write the answers to ``output`` (.jsonl/.csv/.parquet).

    Each answer row: ``source`` (``file:line`` or ``file:row N``), ``id`` (the input's ``id_field``, when rows have one),
    ``answer``, then ``prob`` (classify: the label's probability) or ``raw`` (extract: the generated text; ``answer`` is
    its parsed object), ``cut`` (the text was shortened to the trained length, as eval does) and ``error``."""
    source, out = Path(input), _output(Path(output), Path(input), input_format, batch_size)
    adapter_dir, version = resolve_model(model, workspace)
    recipe = artifact_recipe(adapter_dir / "recipe.json")
    inputs = read_inputs(TASKS[recipe.task.type], recipe.task, source, input_format, id_field)
    _refuse(inputs, skip_bad, out)
    answers = predict_examples(recipe, resolve_base(recipe.model), adapter_dir, [r.example for r in inputs.rows], batch_size, reporter)
    kind = get_task(recipe.task, read_manifest(adapter_dir, "adapter")["labels"]).decoder().kind
    columns = ["source", *(["id"] if inputs.has_ids else []), "answer", *_EXTRA[kind], "cut", "error"]
    rejects = out.with_name(out.name + ".rejects.jsonl") if skip_bad else None
    if rejects is not None:
        write_jsonl(rejects, inputs.rejects)
    write_rows(out, [_answer_row(row, answer, cut, kind) for row, (answer, cut) in zip(inputs.rows, answers)], columns)
    return PredictResult(out, len(inputs.rows), len(inputs.rejects), rejects, adapter_dir, version)


_EXTRA = {"labels": ["prob"], "json": ["raw"], "free": []}  # the columns beside `answer`, by the task's decoder kind
_NO_ANSWER = {"json": "no JSON object in the answer (did it run out of task.max_new_tokens?)", "free": "the answer is empty"}


def resolve_model(model: str | Path, workspace: str | Path | None = None) -> tuple[Path, str | None]:
    """``(adapter folder, registry version or None)`` for an adapter folder or a registry reference."""
    path = Path(model)
    if path.is_dir():
        read_manifest(path, "adapter")
        return path, None
    ref = registry.parse_reference(str(model))
    if ref is None:
        raise InputError(f"MODEL {str(model)!r} is not an adapter folder (no such folder) nor a registered model name",
                         hint="give the adapter folder `microtune train` printed, or a registered model: NAME@champion, NAME@v3, "
                              "NAME/3 or NAME (`microtune models list`)")
    client = registry_at(workspace)
    found = registry.resolve_reference(client, *ref)
    return registry.adapter_path(client, found), found.version


def _output(out: Path, source: Path, input_format: str, batch_size: int | None) -> Path:
    """Refuse what cannot work before anything loads: the output's format, overwriting the input, an unknown input format."""
    if out.is_dir():
        raise InputError(f"--output {out} is a folder", hint="name a file in it, e.g. answers.jsonl")
    if out.suffix.lower() not in SUFFIXES:
        raise InputError(f"--output {out}: the answers are written as {', '.join(SUFFIXES)} (by extension), not {out.suffix or 'no extension'!r}",
                         hint="name the output e.g. answers.jsonl, answers.csv or answers.parquet")
    if out.resolve() == source.resolve():
        raise InputError(f"--output {out} is the input file", hint="write the answers to another file")
    if input_format not in FORMATS:
        raise InputError(f"--format {input_format!r} is not an input format", hint=f"one of: {', '.join(FORMATS)}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: at least 1", hint="leave it out for the recipe's eval.batch_size")
    return out


def _refuse(inputs: Inputs, skip_bad: bool, out: Path) -> None:
    """Problems with the source as a whole always stop the step; bad rows stop it unless ``skip_bad``; so does having
    nothing left to answer. Nothing is written when it stops."""
    if inputs.fatal or (inputs.rejects and not skip_bad) or not inputs.rows:
        n = len(inputs.problems)
        fix = (f"fix the rows listed above (file:line), or pass --skip-bad to answer the others and write the bad ones to "
               f"{out.name}.rejects.jsonl") if not inputs.fatal and inputs.rows else "fix the input listed above"
        what = "every row is bad" if not inputs.rows and inputs.rejects else f"{n} input problem(s)"
        raise DataError(f"{what}; nothing was written", problems=inputs.problems, hint=fix)


def _answer_row(row: InputRow, found: Answer, cut: bool, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {"source": row.where, "id": row.id, "answer": found.answer, "cut": cut,
                           "error": _NO_ANSWER.get(kind) if found.answer is None else None}
    if kind == "labels":
        out["prob"] = None if found.prob is None else round(found.prob, 6)
    elif kind == "json":
        out["raw"] = found.raw
    return out
