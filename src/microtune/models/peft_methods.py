"""PEFT method builders: one function per ``method.kind``, registered in ``METHODS``.

Builders turn the recipe section into flat keyword arguments for PEFT; nothing else reads the config.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from microtune.config import LoraConfig
from microtune.core.errors import RecipeError


def build_lora(method: LoraConfig, seed: int) -> Any:
    from peft import LoraConfig as PeftLora
    from peft import TaskType

    return PeftLora(
        task_type=TaskType.CAUSAL_LM,
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        bias="none",
    )


METHODS: dict[str, Callable[[Any, int], Any]] = {"lora": build_lora}


def apply_method(model: Any, method: LoraConfig, seed: int) -> Any:
    """Wrap ``model`` with the PEFT adapter the recipe asks for; returns a ``PeftModel``."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)  # adapter initialisation is part of the run's seed
    try:
        return get_peft_model(model, METHODS[method.kind](method, seed))
    except ValueError as exc:  # PEFT's word on a module list that does not fit this model
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise RecipeError(f"method.target_modules: PEFT cannot apply {method.kind} here: {str(exc)[:300]}",
                          hint=f"use `all-linear` or names of this model's linear layers: {names}") from None


def param_counts(model: Any) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}
