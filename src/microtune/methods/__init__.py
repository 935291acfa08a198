"""Fine-tuning methods, one module each (like PEFT's ``tuners/<method>/``), in one registry.

    from microtune import methods
    methods.spec("qlora").capabilities.fsdp        # False
    methods.kinds_with("mixed_batch")              # ["lora", "qlora"]

Each module holds a method's recipe section (``method: {kind: ...}``), its builder (section → PEFT
config) and its capability flags (``base.Capabilities``). Adding a method is one module and one
``register`` line below; the recipe (``microtune.config``) rebuilds its ``method`` union from the
registry and takes every method-vs-option rule from the flags. A method registered later (a plugin,
a test) works the same: ``register`` tells the recipe to rebuild.
"""
from __future__ import annotations

import difflib

from microtune.core.errors import RecipeError
from microtune.core.registry import Registry
from microtune.core.schema import Section
from microtune.methods import dora, full, ia3, lora, prefix_tuning, prompt_tuning, qlora
from microtune.methods.base import Capabilities, MethodContext, MethodSpec, refusal
from microtune.methods.dora import DoraConfig
from microtune.methods.full import FullConfig
from microtune.methods.ia3 import Ia3Config
from microtune.methods.lora import LoraConfig
from microtune.methods.prefix_tuning import PrefixTuningConfig
from microtune.methods.prompt_tuning import PromptTuningConfig
from microtune.methods.qlora import QloraConfig

_REGISTRY: Registry[MethodSpec] = Registry("method kind")
on_change = _REGISTRY.on_change  # the recipe rebuilds its `method` union on every register/unregister


def register(method: MethodSpec) -> MethodSpec:
    """Add a method; whatever is built from the registry (the recipe's ``method`` union) is rebuilt."""
    return _REGISTRY.add(method.kind, method)


def unregister(kind: str) -> None:
    """Remove a method (a plugin unloading, a test cleaning up); dependants are rebuilt."""
    _REGISTRY.remove(spec(kind).kind)


def spec(kind: str) -> MethodSpec:
    """The registered method ``kind``; an unknown kind (e.g. from an artifact of a plugin not loaded) is a RecipeError."""
    found = _REGISTRY.get(kind)
    if found is None:
        near = difflib.get_close_matches(str(kind), list(_REGISTRY), n=1, cutoff=0.5)
        raise RecipeError(f"unknown method kind {kind!r}" + (f"; did you mean {near[0]!r}?" if near else ""),
                          hint=f"use one of: {', '.join(_REGISTRY)}")
    return found


def has(kind: str | None, capability: str) -> bool:
    """Whether ``kind`` is registered and has ``capability``: for scanning old artifacts, where an unknown kind is no error."""
    found = _REGISTRY.get(kind) if kind is not None else None
    return found is not None and found.can(capability)


def kinds() -> list[str]:
    """Every registered kind, in registration order (the order of messages and the schema)."""
    return list(_REGISTRY)


def specs() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def configs() -> dict[str, type[Section]]:
    """``kind`` → its recipe section class."""
    return {k: s.config for k, s in _REGISTRY.items()}


def kinds_with(capability: str) -> list[str]:
    """The kinds that have ``capability`` (a ``Capabilities`` flag name)."""
    return [k for k, s in _REGISTRY.items() if s.can(capability)]


def conflict(kind: str, capability: str, option: str, instead: str) -> str | None:
    """Why a recipe option that needs ``capability`` cannot be used with ``kind`` (naming the kinds that can), or None."""
    return refusal(spec(kind), capability, option, kinds_with(capability), instead)


register(lora.SPEC)
register(dora.SPEC)
register(qlora.SPEC)
register(ia3.SPEC)
register(prompt_tuning.SPEC)
register(prefix_tuning.SPEC)
register(full.SPEC)

__all__ = ["Capabilities", "DoraConfig", "FullConfig", "Ia3Config", "LoraConfig", "MethodContext", "MethodSpec", "PrefixTuningConfig",
           "PromptTuningConfig", "QloraConfig", "configs", "conflict", "has", "kinds", "kinds_with", "on_change", "register",
           "spec", "specs", "unregister"]
