"""Small shims over transformers API changes, so microtune runs on 4.56 … 5.x alike."""
from __future__ import annotations

import copy
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


def kv_layers(cache: Any) -> list[tuple[Any, Any]]:
    """``(keys, values)`` per layer of a dynamic KV cache, each ``[batch, heads, length, head_dim]``: transformers ≥ 4.56
    keeps them on ``cache.layers[i].keys/values``, earlier releases in ``cache.key_cache/value_cache``."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def set_kv_layers(cache: Any, layers: list[tuple[Any, Any]]) -> None:
    """Replace the tensors of every layer (same layer count) in place: the cache object the model holds stays."""
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, layers):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache[:] = [k for k, _ in layers]
        cache.value_cache[:] = [v for _, v in layers]


def select_rows(cache: Any, index: Any, expand: int = 0) -> Any:
    """A new cache whose row i is row ``index[i]`` of ``cache``, which stays as it is (one gather per tensor, no full copy
    first). With ``expand`` every row of the new cache is a view of row ``index[0]``: ``expand`` rows, no copy (a forward
    concatenates onto a cache, it never writes into one)."""
    picked = [(k[index[:1]].expand(expand, -1, -1, -1), v[index[:1]].expand(expand, -1, -1, -1)) if expand
              else (k[index], v[index]) for k, v in kv_layers(cache)]
    new = copy.copy(cache)
    if hasattr(cache, "layers"):
        new.layers = [copy.copy(layer) for layer in cache.layers]
    else:
        new.key_cache, new.value_cache = list(cache.key_cache), list(cache.value_cache)
    set_kv_layers(new, picked)
    return new


def takes_custom_mask(module: Any) -> bool:
    """Whether the model's attention kernel applies a 4D mask as given (SDPA, eager, microtune's short-eager): flash
    kernels take padding masks only, and sliding-window models build their own per-layer masks."""
    from microtune.models.short_attention import NAME

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    kernel = getattr(getattr(base, "config", None), "_attn_implementation", None) or "sdpa"
    return kernel in ("sdpa", "eager", NAME) and not uses_sliding_window(module)


def mask_for_kernel(mask: Any, module: Any, dtype: Any) -> Any:
    """A boolean 4D mask (True: attend) in the form the model's attention kernel takes: SDPA the booleans; the eager
    kernel (and the short-eager one, which runs either) adds the mask to its scores, so it needs 0 / -inf floats."""
    import torch

    from microtune.models.short_attention import NAME

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    if getattr(base.config, "_attn_implementation", "sdpa") in ("eager", NAME):
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def uses_sliding_window(module: Any) -> bool:
    """Sliding-window attention keeps only the last window in its cache layers: such a cache cannot be padded and
    merged row-wise, so the batch generator recomputes instead of caching for these models."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    config = getattr(base, "config", None)
    if config is None:
        return False
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return True
    return getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
