"""Small shims over transformers API changes, so microtune runs on 4.56 … 5.x alike."""
from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(module: Any) -> str:
    """transformers ≥ 5.24 calls the KV cache argument `cache`; earlier releases `past_key_values`."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return _cache_kwarg_of(type(base))


def cache_of(output: Any) -> Any:
    """The KV cache of a model output, under either name."""
    return getattr(output, "cache", None) or output.past_key_values


@functools.cache
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def last_logits_only(module: Any) -> dict[str, Any]:
    """Forward kwargs that compute the LM head on the last position only (``logits_to_keep=1``), where the
    model supports it: over a prompt the head is ~20 % of a small model's FLOPs, and only the last row is read."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return {"logits_to_keep": 1} if _keeps_logits(type(base)) else {}
