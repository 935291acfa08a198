"""Task types: one file each, registered in ``TASKS`` (the same table a plugin would use).

Every task has the same shape: ``normalize`` (raw row → example, with problems), ``label_of`` (the
stratum for splits and balancing, ``None`` for tasks without labels), ``messages`` / ``target`` (the
prompt and the completion), ``candidates`` (answers for constrained decoding, ``None`` for free
generation), ``gold`` / ``parse`` / ``metrics`` / ``example_scores`` and ``main_metric``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from microtune.config import TaskConfig
from microtune.tasks.classify import ClassifyTask
from microtune.tasks.extract import ExtractTask
from microtune.tasks.generate import GenerateTask

TASKS: dict[str, Any] = {"classify": ClassifyTask, "extract": ExtractTask, "generate": GenerateTask}


def get_task(cfg: TaskConfig, labels: Sequence[str] = ()) -> Any:
    return TASKS[cfg.type](cfg, labels)


__all__ = ["TASKS", "ClassifyTask", "ExtractTask", "GenerateTask", "get_task"]
