"""The attention kernel CPU training runs under ``model.attention: auto``: eager for short batches, SDPA for long ones.

On a CPU, PyTorch's SDPA takes its flash kernel, whose backward costs ~6× its forward for the short rows of
classification data (a 135M model, batch 8, ~40 tokens: 13 % of a training step in a profile), while the eager
kernel — two matmuls and a softmax — runs those shapes ~15 % faster per step (benchmarks/train_speed.py). Eager
holds the score matrix (batch × heads × queries × keys) for backward, so a call above ``SHORT_SCORES`` scores
goes to SDPA: memory stays that of SDPA wherever it would matter. Both kernels compute exact attention; the mask
is the eager one (additive floats), which SDPA takes as well.

Registered with transformers' attention interfaces under ``NAME``; ``use(model)`` switches a loaded model to it.
"""
from __future__ import annotations

from typing import Any

NAME = "short_eager"
SHORT_SCORES = 1 << 20  # batch × heads × queries × keys of one call: ~6 MiB of saved scores per layer at most


def use(model: Any) -> bool:
    """Switch a model that runs SDPA to the short-eager kernel; true when it did (models without SDPA keep theirs)."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, eager_mask)


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Eager attention when the call's score matrix is small and the layer needs nothing eager lacks, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scores = query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
    special = any(kwargs.get(k) is not None for k in ("softcap", "sliding_window", "s_aux", "position_bias"))
    if scores > SHORT_SCORES or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _eager(module, query, key, value, attention_mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0))


def _eager(module: Any, query: Any, key: Any, value: Any, mask: Any, scaling: float | None, dropout: float) -> tuple[Any, Any]:
    """transformers' eager attention (Llama's): grouped keys repeated, scores + additive mask, fp32 softmax."""
    import torch

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if mask is not None:
        weights = weights + mask[:, :, :, : key.shape[-2]]
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
