"""Read annotated rows from JSONL, CSV, OpenAI chat fine-tuning JSONL, Parquet and Hugging Face datasets, keeping where each came from.

``read_rows(path, fmt, log)`` yields ``(line, row)`` for every readable row of a text file and records every
unreadable one in ``log`` (not UTF-8, not JSON, not an object, bad chat shape) instead of stopping
at the first, so a user sees all problems of a file at once.

``located_rows(source, fmt, log)`` is the one entry for every kind of source: it yields ``(where, row)`` with
``where`` = ``file:line`` for text files, ``file.parquet:row N`` for Parquet (``read_parquet``) and
``folder[split]:row N`` / ``hf:owner/name@revision[split]:row N`` for Hugging Face datasets (``read_hf``). A row
index is 0-based, as ``ds[N]`` and ``df.iloc[N]`` count. Table rows come as plain Python values — nested
structs as dicts, lists as lists, nulls as ``None`` — so the row checks treat them exactly like JSONL rows.
"""
from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microtune.config import HfSource
from microtune.core.errors import ProblemLog
from microtune.core.jsonl import BOM, OnError, iter_jsonl, numbered_lines

FORMATS = ("jsonl", "csv", "openai_chat", "parquet")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_EXTRA = "pip install 'microtune[hf]'"  # the optional extra that brings Hugging Face `datasets`
_BATCH = 4096  # Parquet rows converted to Python at a time: memory stays flat on a large file
CSV_STOPPED = "not a readable CSV row"  # problems after which a reader reads no further rows of the file:
PARQUET_STOPPED = "Parquet data could not be read from here on"  # they concern the rest of the file, not one row
STOPPED = (CSV_STOPPED, PARQUET_STOPPED)


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return "parquet"
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
            log.error(f"{path}:{reader.line_num or 1}", f"{CSV_STOPPED} ({exc}); quote the cell or remove the character", None)
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


def located_rows(source: Path | HfSource, fmt: str, log: ProblemLog) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` for every readable row of any source; problems go to ``log`` at their ``where``."""
    if isinstance(source, HfSource) or is_hf_folder(source):
        yield from read_hf(source if isinstance(source, HfSource) else HfSource(hf=str(source)), fmt, log)
        return
    if detect_format(source, fmt) == "parquet":
        yield from read_parquet(source, fmt, log)
        return
    for line, row in read_rows(source, fmt, log):
        yield f"{source}:{line}", row


def readable(source: Path | HfSource, log: ProblemLog) -> bool:
    """A file source exists, is a file (or a save_to_disk folder) and is not empty; HF sources are checked as they open."""
    if isinstance(source, HfSource) or is_hf_folder(source):
        return True
    if source.is_dir():
        log.error(str(source), "is a folder, not a data file: name a .jsonl or .csv file inside it (or a .parquet file, or a "
                  "folder written by Dataset.save_to_disk)", None)
        return False
    if not source.is_file():
        log.error(str(source), "data file not found", None)
        return False
    if source.stat().st_size == 0:
        log.error(f"{source}:1", "data file is empty", None)
        return False
    return True


def is_hf_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk`` (``dataset_dict.json``)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def read_parquet(path: Path, fmt: str, log: ProblemLog) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a Parquet file, read in batches, each at ``file:row N``; an unreadable file or batch is one problem."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        columns = table.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        log.error(str(path), f"not a readable Parquet file ({_first_line(exc)}); write it with pyarrow or pandas `to_parquet`", None)
        return
    chat = _chat_columns(columns, fmt, str(path), log)
    if chat is None:
        return
    index = 0
    try:
        for batch in table.iter_batches(batch_size=_BATCH):
            for row in batch.to_pylist():
                yield from _table_row(row, f"{path}:row {index}", chat, log)
                index += 1
    except (pa.ArrowException, OSError) as exc:  # a damaged page: the rows before it were read and checked
        log.error(f"{path}:row {index}", f"{PARQUET_STOPPED} ({_first_line(exc)})", None)


def read_hf(spec: HfSource, fmt: str, log: ProblemLog) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a Hugging Face dataset (a ``save_to_disk`` folder or a hub id), each at ``<name>[split]:row N``."""
    where = hf_where(spec)
    try:
        import datasets
    except ImportError:
        log.error(where, f"reading Hugging Face datasets needs the `datasets` package: {HF_EXTRA}", None)
        return
    ds = _open_local(datasets, spec, where, log) if _is_local(spec) else _open_hub(datasets, spec, where, log)
    if ds is None:
        return
    chat = _chat_columns(list(ds.column_names), fmt, where, log)
    if chat is None:
        return
    for index, row in enumerate(ds):
        yield from _table_row(row, f"{where}:row {index}", chat, log)


def hf_where(spec: HfSource) -> str:
    """How a Hugging Face source is named in problems: the folder, or ``hf:owner/name@revision``, then ``[split]``."""
    name = spec.hf if _is_local(spec) else f"hf:{spec.hf}" + (f"@{spec.revision}" if spec.revision else "")
    return name + (f"[{spec.split}]" if spec.split else "")


def _is_local(spec: HfSource) -> bool:
    """The recipe loader made every local folder absolute; anything else is a hub id."""
    return Path(spec.hf).is_absolute()


def _open_local(datasets: Any, spec: HfSource, where: str, log: ProblemLog) -> Any:
    """The ``Dataset`` of a ``save_to_disk`` folder (one split of a ``DatasetDict`` folder), or ``None`` with the problem logged."""
    hub_only = [k for k in ("revision", "subset") if getattr(spec, k) is not None]
    if hub_only:
        log.error(where, f"{' and '.join(hub_only)} apply to hub datasets only; this is a local folder: remove them", None)
        return None
    if not Path(spec.hf).is_dir():
        log.error(where, "dataset folder not found (a folder written by Dataset.save_to_disk, relative to the recipe)", None)
        return None
    try:
        ds = datasets.load_from_disk(spec.hf)
    except (FileNotFoundError, ValueError, OSError) as exc:
        log.error(where, f"not a folder written by Dataset.save_to_disk ({_first_line(exc)})", None)
        return None
    if isinstance(ds, datasets.DatasetDict):
        return _pick_split(ds, spec, where, log)
    if spec.split is not None and ds.split is not None and str(ds.split) != spec.split:
        log.error(where, f"this folder holds the {str(ds.split)!r} split, not {spec.split!r}: set split: {ds.split} or leave it out", None)
        return None
    return ds


def _pick_split(ds: Any, spec: HfSource, where: str, log: ProblemLog) -> Any:
    splits = ", ".join(ds)
    if spec.split is None:
        log.error(where, f"a DatasetDict folder with the splits {splits}: name one, e.g. {{hf: {spec.hf}, split: {next(iter(ds), 'train')}}}", None)
        return None
    if spec.split not in ds:
        log.error(where, f"no split {spec.split!r} in this folder; it has {splits}", None)
        return None
    return ds[spec.split]


def _open_hub(datasets: Any, spec: HfSource, where: str, log: ProblemLog) -> Any:
    """One split of a hub dataset (online), or ``None`` with the problem logged; an unpinned revision is a warning."""
    if spec.split is None:
        log.error(where, "a hub dataset needs `split:` (e.g. {hf: " + spec.hf + ", split: train}); a local folder needs a path "
                  "(`./folder`) when it is not found next to the recipe", None)
        return None
    if not is_pinned(spec.revision):
        moving = "no revision" if spec.revision is None else f"revision {spec.revision!r} is a branch or tag, which can move"
        log.warn(where, f"{moving}: a later run may read other rows; pin a commit, e.g. revision: <40-hex commit from the hub's "
                 "history> (check records the rows' hash either way)", spec.revision)
    try:
        return datasets.load_dataset(spec.hf, name=spec.subset, split=spec.split, revision=spec.revision)
    except Exception as exc:  # noqa: BLE001 (network, unknown id, split or revision: every one is reported as a problem)
        log.error(where, f"could not load it from the Hugging Face hub ({type(exc).__name__}: {_first_line(exc)}); check the id, "
                  "split and revision, and the network — or save it once with Dataset.save_to_disk and name that folder", None)
        return None


def is_pinned(revision: str | None) -> bool:
    """A commit hash (7 to 40 hex digits) pins the rows; a branch or tag name can move, and no revision means the newest."""
    return revision is not None and re.fullmatch(r"[0-9a-f]{7,40}", revision) is not None


def _chat_columns(columns: list[str], fmt: str, where: str, log: ProblemLog) -> bool | None:
    """Whether a table's rows are OpenAI chat rows (`openai_chat`, or `auto` with a `messages` column); ``None`` when
    ``data.format`` names a text format, which a table cannot be read as (an ignored option would be a silent defect)."""
    if fmt in ("auto", "openai_chat", "parquet"):
        return fmt == "openai_chat" or (fmt == "auto" and "messages" in columns)
    log.error(where, f"data.format {fmt} reads text files; this is a table (Parquet or a Hugging Face dataset): set data.format "
              "to auto (or openai_chat for a `messages` column)", fmt)
    return None


def _table_row(row: dict[str, Any], where: str, chat: bool, log: ProblemLog) -> Iterator[tuple[str, dict[str, Any]]]:
    plain = {str(k): _plain(v) for k, v in row.items()}
    if not chat:
        yield where, plain
        return
    converted = _chat_row(plain, where, log)
    if converted is not None:
        yield where, converted


def _plain(value: Any) -> Any:
    """A table cell as the value JSON would give: dates and times as ISO text, decimals as floats, UTF-8 bytes as
    text; structs, lists and nulls stay dicts, lists and ``None``. So a row from Parquet checks exactly like its JSONL twin."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value  # not text: a field check reports it as not a string
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
