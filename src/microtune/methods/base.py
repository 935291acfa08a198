"""What every fine-tuning method declares: its recipe section, its PEFT builder and its capability flags.

    SPEC = MethodSpec(kind="lora", config=LoraConfig, build=build, capabilities=Capabilities(...))

The flags are the one place a method says what it can do; the recipe rules (fsdp, packing), the
training engine, the loaders and the server look them up instead of listing kinds. A flag that is off
carries its reason in ``MethodSpec.reasons``, so an error can say why and which kinds can instead.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from microtune.core.schema import Section


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a method can do. Every flag is spelled out by each method (no defaults): a new method cannot
    inherit a claim nobody checked."""

    prompt_learning: bool  # trains virtual tokens in front of the prompt (prompt/prefix tuning), not weights
    mixed_batch: bool  # its adapter can join a PEFT mixed-adapter batch (rows name their adapter) on the server's shared, unquantised base
    mergeable: bool  # its adapter folds into the base weights (`microtune export --merge`)
    vllm_servable: bool  # its adapter is a plain LoRA that vLLM serves (`microtune export --vllm`)
    fsdp: bool  # trains under train.distributed.strategy: fsdp
    packing: bool  # trains with train.packing (examples end to end in one row)
    quantized_base: bool  # needs its base loaded in 4-bit (``MethodSpec.quantize`` builds the config)
    full_model: bool  # trains and writes every weight: a whole model, no adapter

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class MethodContext:
    """What a builder may need beyond its recipe section: the run's seed, the task instruction (prompt tuning
    starts from it) and the base model's folder (its tokenizer)."""

    seed: int
    instruction: str = ""
    base_path: str = ""


Builder = Callable[[Any, MethodContext], Any]


@dataclass(frozen=True)
class MethodSpec:
    """One method: ``kind`` (the recipe's ``method.kind``), its section class, its builder (section → PEFT
    config; ``None`` for a full-model method, which wraps nothing), its capabilities, the reason of each flag
    that is off, and for a 4-bit base the function that builds its quantization config."""

    kind: str
    config: type[Section]
    build: Builder | None
    capabilities: Capabilities
    reasons: Mapping[str, str] = field(default_factory=dict)
    quantize: Callable[[Any, str, bool], Any] | None = None  # (section, weights' resolved dtype, native bf16?) -> 4-bit config

    def __post_init__(self) -> None:
        # the flags that code paths hang on must agree with the hooks, or a flag would lie
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))
        if not (isinstance(self.config, type) and issubclass(self.config, Section)):
            raise ValueError(f"method {self.kind!r}: its section must be a microtune.core.schema.Section subclass (got {self.config!r})")
        default = getattr(self.config.model_fields.get("kind"), "default", None)
        if default != self.kind:
            raise ValueError(f"method {self.kind!r}: its section {self.config.__name__} must have a `kind` field defaulting to "
                             f"{self.kind!r} (got {default!r})")
        if self.capabilities.full_model != (self.build is None):
            raise ValueError(f"method {self.kind!r}: full_model methods have no builder (build=None), adapter methods need one")
        if self.capabilities.quantized_base != (self.quantize is not None):
            raise ValueError(f"method {self.kind!r}: quantized_base methods need `quantize` (their 4-bit config), others none")
        unknown = set(self.reasons) - set(Capabilities.names())
        if unknown:
            raise ValueError(f"method {self.kind!r}: reasons for unknown capabilities {sorted(unknown)}")

    def can(self, capability: str) -> bool:
        if capability not in Capabilities.names():
            raise ValueError(f"unknown capability {capability!r} (one of: {', '.join(Capabilities.names())})")
        return bool(getattr(self.capabilities, capability))


def refusal(method: MethodSpec, capability: str, option: str, able: Sequence[str], instead: str) -> str | None:
    """The message for a recipe option that needs ``capability`` used with a method that lacks it, or None.

    ``option`` is how the option reads before the kind ("train.packing cannot be used with"), ``able`` the
    kinds that have the capability (offered as the alternative), ``instead`` the way out that keeps the method."""
    if method.can(capability):
        return None
    why = method.reasons.get(capability, f"{method.kind} does not declare the {capability!r} capability")
    alternatives = [k for k in able if k != method.kind]
    other = f"use method.kind={_one_of(alternatives)} with {capability}, or " if alternatives else ""
    return f"{option} method.kind={method.kind}: {why}; {other}keep {method.kind} and {instead}"


def _one_of(kinds: Sequence[str]) -> str:
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
