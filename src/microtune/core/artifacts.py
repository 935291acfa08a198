"""Artifacts: a folder with a ``manifest.json``, written atomically (temp folder, then rename).

Stages meet only through these folders. ``write_artifact`` yields a temporary folder; on success it
is renamed into place, on any error it is removed, so a crash never leaves a half-written artifact.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microtune.core.atomic import atomic_dir, read_json, write_json
from microtune.core.errors import ArtifactError

MANIFEST = "manifest.json"
__all__ = ["MANIFEST", "read_json", "read_manifest", "write_artifact", "write_json"]  # read/write_json: long-standing home


@contextlib.contextmanager
def write_artifact(dest: Path, kind: str, manifest: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, manifest)``; fill both, and on exit the folder replaces ``dest`` whole."""
    manifest = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    with atomic_dir(dest) as tmp:
        yield tmp, manifest
        write_json(tmp / MANIFEST, manifest)


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
