"""Build the dataset artifact: read every file, validate every row, split, check leakage, count.

    result = build_dataset(recipe)      # raises DataError listing *all* bad rows as file:line
    write_dataset(result, folder)

Errors (the artifact is not written): missing/empty file, not UTF-8, bad JSON, missing or empty
field, label outside ``task.labels``, train/test overlap. Warnings: duplicates within a split, test
labels unseen in train, a majority label a constant guess would exploit, train/valid overlap.
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune.config import HfSource, Recipe
from microtune.core.errors import DataError, ProblemLog
from microtune.core.hashing import hash_file, hash_value
from microtune.core.jsonl import read_jsonl, write_jsonl
from microtune.data.readers import detect_format, hf_where, is_hf_folder, located_rows, readable
from microtune.tasks import TASKS, TaskSection

SPLITS = ("train", "valid", "test")


@dataclass
class DatasetResult:
    splits: dict[str, list[dict[str, Any]]]
    labels: list[str]
    log: ProblemLog
    sources: dict[str, dict[str, str]]
    key: str  # content key of the artifact: source hashes + recipe sections that shape it
    stats: dict[str, Any] = field(default_factory=dict)


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used for duplicate and leakage checks."""
    return re.sub(r"\s+", " ", text).strip().lower()


LOOKALIKE_MAX_ROWS = 2  # a label this rare beside a near-identical frequent one is flagged as a likely typo
LOOKALIKE_DISTANCE = 0.15  # 1 - difflib ratio, case-insensitive: 0 for case variants, ~0.08 for one wrong letter


def build_dataset(recipe: Recipe) -> DatasetResult:
    log = ProblemLog()
    given = {s: getattr(recipe.data, s) for s in SPLITS if getattr(recipe.data, s) is not None}
    raw: dict[str, list[dict[str, Any]]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for name, source in given.items():
        raw[name], sources[name] = _load_source(recipe, source, log)
    splits = _split(raw, recipe)
    task_cls = TASKS[recipe.task.type]
    labels: list[str] = []
    if task_cls.has_labels:
        declared = recipe.task.declared_labels()
        labels = declared or sorted({a for e in splits["train"] for a in task_cls.atoms_of(e)})
        _check_labels(splits, labels, declared is not None, task_cls.atoms_of, log)
        _check_balance(splits["train"], labels, log)
    _check_overlap(splits, log)
    if log.errors:
        _raise(log)
    key = hash_value({"sources": {s: v["sha256"] for s, v in sources.items()}, "task": recipe.task.model_dump(mode="json"),
                      "split": recipe.data.split.model_dump(), "format": recipe.data.format})
    return DatasetResult(splits, labels, log, sources, key)


def _raise(log: ProblemLog) -> None:
    n = len(log.errors)
    raise DataError(f"{n} data problem(s); nothing was written", problems=log.errors,
                    hint="fix the rows listed above (file:line) and run `microtune check` again")


def load_rows(recipe: Recipe, path: Path | HfSource, log: ProblemLog) -> list[dict[str, Any]]:
    """Read and normalise one data source with the recipe's field mapping; bad rows go to ``log`` at file:line (or row N)."""
    return _load_source(recipe, path, log)[0]


def _load_source(recipe: Recipe, source: Path | HfSource, log: ProblemLog) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The normalised rows of one source and its manifest record (what it was, its format, the sha256 of its content).

    A file is hashed byte for byte; a Hugging Face dataset by the rows read (a hub revision or a folder's Arrow files
    may change without its name changing: the rows are what the artifact is made of)."""
    if not readable(source, log):
        return [], {}
    fmt, task_cls, chat_cfg = recipe.data.format, TASKS[recipe.task.type], _chat_fields(recipe.task)
    table = isinstance(source, HfSource) or is_hf_folder(source)
    rows, read = [], []
    for where, row in located_rows(source, fmt if table else _row_format(task_cls, source, fmt), log):
        if table:
            read.append(row)
        example, problems = task_cls.normalize(row, chat_cfg if row.get("_chat") else recipe.task)
        for reason, got in problems:
            log.error(where, reason, got)
        if example is not None:
            rows.append({**example, "source": where})
    name = hf_where(source) if isinstance(source, HfSource) else str(source)
    if not rows and not log.errors:
        log.error(name, "no rows in file" if not table else "no rows in dataset", None)
    if not table:
        return rows, {"path": str(source), "sha256": hash_file(source), "format": detect_format(source, fmt)}
    spec = source if isinstance(source, HfSource) else HfSource(hf=str(source))
    return rows, {**spec.model_dump(exclude_none=True), "sha256": hash_value(read), "format": "hf", "rows": len(read)}


def _row_format(task_cls: type, path: Path, fmt: str) -> str:
    """The reader format for a file: a task that reads OpenAI chat rows whole (``reads_chat_rows``: `chat`) takes them as
    plain JSONL objects, its own ``normalize`` checking every turn; the others get them cut to ``{text, label}``."""
    if getattr(task_cls, "reads_chat_rows", False) and detect_format(path, fmt) == "openai_chat":
        return "jsonl"
    return fmt


def _chat_fields(task: TaskSection) -> TaskSection:
    """The task section for OpenAI chat rows, which the reader gives as ``{"text": user turn, "label": answer}``."""
    names = {"text_field": "text", "label_field": "label", "target_field": "label"}
    return task.model_copy(update={k: v for k, v in names.items() if k in type(task).model_fields})


def _split(raw: dict[str, list[dict[str, Any]]], recipe: Recipe) -> dict[str, list[dict[str, Any]]]:
    """Stratified, seeded split of train for the splits that have no file of their own."""
    splits = {s: list(raw.get(s, [])) for s in SPLITS}
    want = {s: getattr(recipe.data.split, s) for s in ("valid", "test") if s not in raw}
    if not any(want.values()):
        return splits
    rng = random.Random(recipe.data.split.seed)
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ex in splits["train"]:  # tasks without labels (extract, generate) form one stratum
        by_label[ex.get("label", "")].append(ex)
    splits["train"] = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        for split_name, share in want.items():
            k = round(len(group) * share) if len(group) > 2 else 0
            splits[split_name] += group[:k]
            group = group[k:]
        splits["train"] += group
    for name in SPLITS:
        rng.shuffle(splits[name])
    return splits


def _check_labels(splits: dict[str, list[dict[str, Any]]], labels: list[str], declared: bool,
                  atoms: Callable[[dict[str, Any]], list[str]], log: ProblemLog) -> None:
    allowed = set(labels)
    train_labels = {a for e in splits["train"] for a in atoms(e)}
    for name in SPLITS:
        for ex in splits[name]:
            for label in atoms(ex):
                if declared and label not in allowed:
                    near = sorted(allowed, key=lambda a: (_distance(a, label), a))[:1]  # ties by name: the same hint every run
                    log.error(ex["source"], f"label not in task.labels (nearest: {near[0]!r})" if near else "label not in task.labels", label)
    if not declared:
        _warn_label_lookalikes(splits, atoms, log)
    for name in ("valid", "test"):
        unseen = sorted({a for e in splits[name] for a in atoms(e)} - train_labels)
        if unseen:
            log.warn(name, f"{len(unseen)} label(s) in {name} never appear in train; the model cannot learn them", unseen[:10])


def _warn_label_lookalikes(splits: dict[str, list[dict[str, Any]]], atoms: Callable[[dict[str, Any]], list[str]],
                           log: ProblemLog) -> None:
    """Labels inferred from the data: a rare label that is a case variant or a near-spelling of a more frequent one
    (`Freeze_Account`, `card_declind`) is most likely a typo that would become a class of its own."""
    counts = Counter(a for name in SPLITS for e in splits[name] for a in atoms(e))
    for label, n in sorted(counts.items()):
        bigger = [other for other, m in counts.items() if m > n and other != label]
        near = sorted(bigger, key=lambda other: (_distance(other, label), other))[:1]
        if near and n <= LOOKALIKE_MAX_ROWS and _distance(near[0], label) <= LOOKALIKE_DISTANCE:
            log.warn("labels", f"label {label!r} ({n} row(s)) looks like a typo of {near[0]!r} ({counts[near[0]]} rows); fix those "
                     "rows, or declare task.labels so unknown labels are errors", label)


def _distance(a: str, b: str) -> float:
    import difflib

    return 1 - difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


def _check_overlap(splits: dict[str, list[dict[str, Any]]], log: ProblemLog) -> None:
    seen: dict[str, dict[str, str]] = {}
    for name in SPLITS:
        index: dict[str, str] = {}
        for ex in splits[name]:
            key = normalize_text(ex["text"])
            if key in index:
                log.warn(ex["source"], f"duplicate text within {name} (first at {index[key]})", ex["text"])
            else:
                index[key] = ex["source"]
        seen[name] = index
    for split, report, consequence in (("test", log.error, " (leakage); remove it from one split"),
                                       ("valid", log.warn, "; validation loss will be optimistic")):
        for ex in splits[split]:
            first = seen["train"].get(normalize_text(ex["text"]))
            if first:
                report(ex["source"], f"{split} row also in train at {first}{consequence}", ex["text"])


def imbalance(labels: list[str]) -> tuple[str, float] | None:
    """``(majority label, share)`` when one label dominates: over 70 % of two labels, or over
    max(50 %, twice the uniform share) of three or more; else ``None``."""
    counts = Counter(labels)
    if len(counts) < 2:
        return None
    label, n = counts.most_common(1)[0]
    share = n / len(labels)
    limit = 0.7 if len(counts) == 2 else max(0.5, 2 / len(counts))
    return (label, share) if share > limit else None


def _check_balance(train: list[dict[str, Any]], labels: list[str], log: ProblemLog) -> None:
    found = imbalance([e["label"] for e in train])
    if found:
        label, share = found
        log.warn("train", f"label {label!r} is {share:.0%} of train: always answering it scores {share:.0%} accuracy; "
                 "train.balance (default auto) samples the labels evenly; judge by macro-F1, not accuracy",
                 f"{round(share * len(train))}/{len(train)}")


def write_dataset(result: DatasetResult, folder: Path) -> None:
    for name in SPLITS:
        write_jsonl(folder / f"{name}.jsonl", result.splits[name])


def read_split(folder: Path, name: str) -> list[dict[str, Any]]:
    return read_jsonl(Path(folder) / f"{name}.jsonl")
