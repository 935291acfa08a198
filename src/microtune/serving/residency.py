"""What the engine holds in memory besides the base model: one LRU under one count limit and one byte budget.

    residency = Residency(max_loaded=8, max_bytes=4096 * MB)
    residency.add(Resident(spec.key, spec.fingerprint, "own", nbytes, model))
    for key in residency.victims(needed={"m1", "m2"}): engine unloads key

An entry is either an adapter living on the shared base (its own parameters counted) or a model instance of
its own (a full model, an IA3 or prompt-learning model on a private copy of the base, a qlora model on its
4-bit base: every parameter and buffer counted). Adapters and whole models compete for the same budget, so
one setting bounds memory whatever mix of methods is served. This module only keeps the books; the engine
loads and unloads (it owns the weights).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MB = 1024 * 1024


@dataclass
class Resident:
    key: str  # the spec's key (unique per artifact content)
    fingerprint: str  # name/version, for logs and /health
    place: str  # catalog.placement(): mixed, alone or own
    nbytes: int
    model: Any = None  # an own instance; None for an adapter on the shared base


class Residency:
    def __init__(self, max_loaded: int, max_bytes: int):
        self.max_loaded, self.max_bytes = max_loaded, max_bytes
        self.entries: OrderedDict[str, Resident] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def touch(self, key: str) -> Resident:
        """Mark an entry as just used (most recent) and return it."""
        self.entries.move_to_end(key)
        return self.entries[key]

    def add(self, resident: Resident) -> None:
        self.entries[resident.key] = resident

    def remove(self, key: str) -> Resident:
        return self.entries.pop(key)

    def victims(self, needed: Iterable[str]) -> list[str]:
        """Least recently used first, the entries to unload until both limits hold — never one in ``needed`` (the
        running batch): if the needed entries alone exceed the budget they stay, and the batch still runs."""
        keep = set(needed)
        count, total, out = len(self.entries), self.nbytes, []
        for key, entry in self.entries.items():
            if count <= self.max_loaded and total <= self.max_bytes:
                break
            if key in keep:
                continue
            out.append(key)
            count, total = count - 1, total - entry.nbytes
        return out

    def report(self) -> list[dict[str, Any]]:
        """The loaded entries, least recently used first: what /health shows."""
        return [{"model": e.fingerprint, "placement": e.place, "bytes": e.nbytes} for e in self.entries.values()]


def tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def model_bytes(model: Any) -> int:
    """Parameters and buffers of a whole model instance (tied weights counted once: named_parameters dedups them)."""
    return tensor_bytes(p for _, p in model.named_parameters()) + tensor_bytes(b for _, b in model.named_buffers())


def adapter_bytes(model: Any, key: str) -> int:
    """The parameters and buffers PEFT added for adapter ``key`` (``…lora_A.<key>.weight``, ``…magnitude_vector.<key>…``)."""
    def own(name: str) -> bool:
        return f".{key}." in name or name.endswith(f".{key}")

    return (tensor_bytes(p for n, p in model.named_parameters() if own(n))
            + tensor_bytes(b for n, b in model.named_buffers() if own(n)))
