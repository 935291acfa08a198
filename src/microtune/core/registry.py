"""The one shape of microtune's extension points: a named table that others build from and hear changes of.

    METHODS = Registry("method kind")       # microtune.methods
    TASKS = Registry("task type")           # microtune.tasks
    TASKS.add("polarity", PolarityTask)     # a plugin or a test; the recipe's `task` union is rebuilt

A ``Registry`` is a read-only mapping (name → entry) plus ``add``/``remove`` and ``on_change`` listeners:
``microtune.config`` listens and rebuilds the recipe's unions, so an entry added later validates like a
built-in one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    def __init__(self, what: str):
        self.what = what  # how an entry's name reads in messages ("method kind", "task type")
        self._entries: dict[str, T] = {}
        self._listeners: list[Callable[[], None]] = []

    def add(self, name: str, entry: T) -> T:
        """Add an entry; every listener is told (the recipe rebuilds its unions)."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        self._changed()
        return entry

    def remove(self, name: str) -> None:
        """Remove an entry (a plugin unloading, a test cleaning up); every listener is told."""
        if self._entries.pop(name, None) is not None:
            self._changed()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every add/remove."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
