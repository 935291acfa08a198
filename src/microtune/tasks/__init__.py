"""Task types: one module each (its recipe section and its task class), registered in ``TASKS``.

Every task class satisfies ``microtune.tasks.base.Task``: ``normalize`` (raw row → example, with problems),
``label_of`` (the stratum for splits and balancing, ``None`` for tasks without labels), ``messages`` /
``target`` (the prompt and the completion), ``decoder`` (a closed label set, a JSON object or free text),
``gold`` / ``parse`` / ``metrics`` / ``example_scores``, ``metric_names`` / ``main_metric`` (the one source of
the metric lists) and ``synth`` (how `microtune synth` makes rows, or ``None``).

A new task type is a module here plus one ``register`` line below — the same shape as ``microtune.methods``:
``microtune.config`` builds the recipe's ``task`` union from this table and rebuilds it on every
``register``/``unregister``, so a type added later (a plugin, a test) validates like a built-in one.
"""
from __future__ import annotations

from collections.abc import Sequence

from microtune.core.registry import Registry
from microtune.tasks.base import DEFAULT_SCORING, PROMPTED, SCORINGS, DecoderSpec, SynthHooks, Task, TaskSection, baselines_of
from microtune.tasks.chat import ChatConfig, ChatTask
from microtune.tasks.classify import ClassifyConfig, ClassifyTask
from microtune.tasks.extract import ExtractConfig, ExtractTask
from microtune.tasks.generate import GenerateConfig, GenerateTask

TASKS: Registry[type[Task]] = Registry("task type")
DEFAULT_TASK = "classify"  # recipes may omit task.type
on_change = TASKS.on_change  # the recipe rebuilds its `task` union on every register/unregister


def register(task: type[Task]) -> type[Task]:
    """Add a task type; whatever is built from the registry (the recipe's ``task`` union) is rebuilt."""
    tag = task.config.model_fields["type"].default if "type" in task.config.model_fields else None
    if tag != task.name:
        raise ValueError(f"task class {task.__name__}: its config's `type` must default to its name {task.name!r} (got {tag!r})")
    return TASKS.add(task.name, task)


def unregister(name: str) -> None:
    """Remove a task type (a plugin unloading, a test cleaning up); dependants are rebuilt."""
    TASKS.remove(name)


register(ClassifyTask)
register(ExtractTask)
register(GenerateTask)
register(ChatTask)


def get_task(cfg: TaskSection, labels: Sequence[str] = ()) -> Task:
    """The task of a recipe's task section, with the dataset's labels (none for tasks without labels)."""
    return TASKS[cfg.type](cfg, labels)  # every task class is built from (its config, the labels)


def all_baselines() -> list[str]:
    """Every baseline name some registered task type declares, in first-seen order (names an endpoint may not take)."""
    return list(dict.fromkeys(b for task in TASKS.values() for b in baselines_of(task)))


__all__ = ["DEFAULT_SCORING", "DEFAULT_TASK", "PROMPTED", "SCORINGS", "TASKS", "ChatConfig", "ChatTask", "ClassifyConfig", "ClassifyTask",
           "DecoderSpec", "ExtractConfig", "ExtractTask", "GenerateConfig", "GenerateTask", "SynthHooks", "Task", "TaskSection",
           "all_baselines", "baselines_of", "get_task", "on_change", "register", "unregister"]
