"""Write rows as JSONL, CSV or Parquet, chosen by the file's extension, whole or not at all (``core.atomic``).

    write_rows(Path("answers.parquet"), rows)     # one dict per row, the same keys in every row

JSONL keeps every value as it is. CSV cells are text: objects and lists are written as their JSON text, ``None``
as an empty cell. Parquet columns take their type from the values; a column whose values Arrow cannot put
under one type (an `id` that is a number in one row and text in another) is written as JSON text.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from microtune.core.atomic import atomic_file
from microtune.core.jsonl import write_jsonl

SUFFIXES = (".jsonl", ".csv", ".parquet")


def write_rows(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Write ``rows`` (with ``columns``, in that order) to ``path`` in the format its extension names."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        write_jsonl(path, ({c: r.get(c) for c in columns} for r in rows))
    elif suffix == ".csv":
        _write_csv(path, rows, columns)
    elif suffix == ".parquet":
        _write_parquet(path, rows, columns)
    else:
        raise ValueError(f"write_rows writes {', '.join(SUFFIXES)}, not {suffix!r}")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with atomic_file(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])


def _write_parquet(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = [_column(pa, [r.get(c) for r in rows]) for c in columns]
    with atomic_file(path, "wb") as f:
        pq.write_table(pa.Table.from_arrays(arrays, names=columns), f)


def _column(pa: Any, values: list[Any]) -> Any:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep every value, as JSON text
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], type=pa.string())
