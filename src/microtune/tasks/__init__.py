"""Task types: one file each, registered in ``TASKS`` (the same table a plugin would use)."""
from __future__ import annotations

from collections.abc import Sequence

from microtune.config import TaskConfig
from microtune.tasks.classify import ClassifyTask

TASKS = {"classify": ClassifyTask}


def get_task(cfg: TaskConfig, labels: Sequence[str]) -> ClassifyTask:
    return TASKS[cfg.type](cfg, labels)


__all__ = ["TASKS", "ClassifyTask", "get_task"]
