"""Task types: one module each (its recipe section and its task class), registered in ``TASKS``.

Every task class satisfies ``microtune.tasks.base.Task``: ``normalize`` (raw row → example, with problems),
``label_of`` (the stratum for splits and balancing, ``None`` for tasks without labels), ``messages`` /
``target`` (the prompt and the completion), ``decoder`` (a closed label set, a JSON object or free text),
``gold`` / ``parse`` / ``metrics`` / ``example_scores``, ``metric_names`` / ``main_metric`` (the one source of
the metric lists) and ``synth`` (how `microtune synth` makes rows, or ``None``).

A new task type is a module here plus one line in ``TASKS``; ``microtune.config`` builds the recipe's
``task`` union from this table (``config.register_task`` adds a type at runtime, e.g. from a plugin).
"""
from __future__ import annotations

from collections.abc import Sequence

from microtune.tasks.base import DecoderSpec, SynthHooks, Task, TaskSection
from microtune.tasks.classify import ClassifyConfig, ClassifyTask
from microtune.tasks.extract import ExtractConfig, ExtractTask
from microtune.tasks.generate import GenerateConfig, GenerateTask

TASKS: dict[str, type[Task]] = {"classify": ClassifyTask, "extract": ExtractTask, "generate": GenerateTask}
DEFAULT_TASK = "classify"  # recipes may omit task.type


def get_task(cfg: TaskSection, labels: Sequence[str] = ()) -> Task:
    """The task of a recipe's task section, with the dataset's labels (none for tasks without labels)."""
    return TASKS[cfg.type](cfg, labels)  # every task class is built from (its config, the labels)


__all__ = ["DEFAULT_TASK", "TASKS", "ClassifyConfig", "ClassifyTask", "DecoderSpec", "ExtractConfig", "ExtractTask", "GenerateConfig",
           "GenerateTask", "SynthHooks", "Task", "TaskSection", "get_task"]
