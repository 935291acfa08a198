"""Artifacts: a folder with a ``manifest.json``, written atomically (temp folder, then rename).

Stages meet only through these folders. ``write_artifact`` yields a temporary folder; on success it
is renamed into place, on any error it is removed, so a crash never leaves a half-written artifact.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microtune.core.errors import ArtifactError

MANIFEST = "manifest.json"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def write_artifact(dest: Path, kind: str, manifest: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, manifest)``; fill both, and on exit the folder replaces ``dest`` whole."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    manifest = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    try:
        yield tmp, manifest
        write_json(tmp / MANIFEST, manifest)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(folder: Path, kind: str) -> dict[str, Any]:
    """Read the manifest of an artifact folder and check it is of the expected kind."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not a microtune {kind} artifact (no {MANIFEST})",
            hint=f"point at a folder written by microtune, or run the stage that writes the {kind}",
        )
    manifest = read_json(path)
    if manifest.get("kind") != kind:
        raise ArtifactError(
            f"{folder} holds a {manifest.get('kind')!r} artifact, expected {kind!r}",
            hint=f"pass the {kind} folder instead",
        )
    return manifest
