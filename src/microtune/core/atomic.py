"""Writes that are whole or absent: build the file (or folder) beside its destination, then rename it over.

    write_json(folder / "metrics.json", metrics)
    write_text(folder / "report.html", page); write_bytes(folder / "plot.png", png)
    with atomic_file(path) as f: ...          # stream a large file (JSONL) through the same mechanism
    with atomic_path(path) as tmp: ...         # a library that opens the file by name itself (gguf's writer)
    with atomic_dir(dest) as tmp: ...          # a whole folder (artifacts, converted models)

Why: a run killed mid-write (kill -9, a full disk, a power cut) must leave the old content or the new,
never a torn file that a rerun, `microtune serve` or another process then reads. The temp name starts with
a dot, carries the writer's pid (``.NAME.tmp-<pid>-…``: the next writer in the folder removes a dead writer's
leftovers) and sits in the destination's folder, so the rename stays on one filesystem (``os.replace`` is atomic
there). The file's data is fsynced before the rename (else a crash can leave the new name on empty data),
and the folder after it (so the rename itself survives a crash).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from microtune.core.crashpoints import reach


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Yield an open temp file beside ``path``; when the block succeeds it replaces ``path``, on an error it is removed.

    The temp file is created with the usual permissions (umask applies), as ``open(path, "w")`` would."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_writers(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding, "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        reach("atomic.file_before_rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside ``path`` for a writer that opens the file by name itself (gguf's writer); when the
    block succeeds the file (closed by then) is fsynced and replaces ``path``, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_writers(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        reach("atomic.file_before_rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    with atomic_file(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json(path: str | Path, data: Any, *, ensure_ascii: bool = True) -> None:
    """Indented JSON plus a final newline; values JSON does not know (paths, dates) are written as text."""
    write_text(path, json.dumps(data, indent=2, default=str, ensure_ascii=ensure_ascii) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside ``dest``; when the block succeeds it becomes ``dest`` in one rename.

    ``replace=True``: an existing ``dest`` is swapped out, then removed (a rewritten artifact).
    ``replace=False``: an existing non-empty ``dest`` makes the rename fail with OSError (it was made first
    elsewhere; the caller decides whether that copy will do). On any error the temp folder is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_writers(dest.parent)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        reach("atomic.before_rename")
        if replace and dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)


def _sweep_dead_writers(folder: Path) -> None:
    """Remove the temp files and folders (and swapped-out folders) in ``folder`` left by writers that died (kill -9,
    power loss): their names carry the writer's pid, and what a dead process was writing will never be renamed into
    place. Every artifact of the folder, not only the one being written: a rerun writes a new run's folder, and the
    killed run's leftover would otherwise stay forever. Live writers' temp files are left alone, so two processes may
    still race to write the same artifact."""
    for leftover in folder.glob(".*"):
        found = _LEFTOVER.match(leftover.name)
        if found is None or alive(int(found.group(1))):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-")  # .NAME.tmp-<pid>-…, .NAME.old-<pid>-…


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host); when the platform cannot tell, it is assumed alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or the platform cannot tell: keep its folder
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows) or fsynced."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
