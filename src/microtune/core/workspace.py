"""The workspace: where a recipe's artifacts and the default MLflow store live.

Layout (default root ``.microtune/`` in the current folder)::

    <root>/mlflow.db                      MLflow tracking + registry (SQLite)
    <root>/mlartifacts/                   MLflow artifact store
    <root>/<recipe>/datasets/<hash12>/    content-addressed dataset artifacts (check)
    <root>/<recipe>/adapters/<run_id>/    adapter artifacts (train)
    <root>/<recipe>/evals/<run_id>/       eval artifacts (eval)
    <root>/<recipe>/synthetic/<run_id>/   synthetic rows, rejects, fidelity report (synth)
    <root>/synth-cache.sqlite             teacher answers keyed by (model, parameters, prompt) (synth)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from microtune.core.errors import ArtifactError

DEFAULT_ROOT = ".microtune"


def cache_dir() -> Path:
    """Per-user cache (converted base models): ``$MICROTUNE_CACHE`` or ``~/.cache/microtune``."""
    env = os.environ.get("MICROTUNE_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microtune"
    base.mkdir(parents=True, exist_ok=True)
    return base


def new_run_id() -> str:
    """Sortable, unique enough for one user: ``YYYYmmdd-HHMMSS-<pid4>``."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: str | Path | None) -> Workspace:
        path = Path(root or DEFAULT_ROOT).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def mlflow_db(self) -> Path:
        """The workspace's own MLflow store (tracking + registry), used when no other URI is given."""
        return self.root / "mlflow.db"

    @property
    def mlflow_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def stage_dir(self, recipe: str, stage: str) -> Path:
        return self.root / recipe / stage

    def latest(self, recipe: str, stage: str) -> Path:
        """The newest finished artifact of a stage for a recipe (by folder name, which sorts by time)."""
        folder = self.stage_dir(recipe, stage)
        done = sorted(p for p in folder.glob("*") if (p / "manifest.json").is_file()) if folder.is_dir() else []
        if not done:
            raise ArtifactError(
                f"no {stage} artifact for recipe {recipe!r} in {self.root}",
                hint=f"run the stage that writes it first (e.g. `microtune {_WRITER[stage]} RECIPE`)",
            )
        return max(done, key=lambda p: p.stat().st_mtime)


_WRITER = {"datasets": "check", "adapters": "train", "evals": "eval", "synthetic": "synth"}
