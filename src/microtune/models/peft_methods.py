"""Fine-tuning method builders: one function per ``method.kind``, registered in ``METHODS``.

    model = apply_method(base_model, recipe.method, MethodContext(seed=13, instruction=..., base_path=...))

A builder turns its recipe section into flat keyword arguments for PEFT; nothing else reads the
config. ``qlora`` needs its base loaded in 4-bit first (``quantization_config`` below);
``full`` trains every weight and wraps nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microtune.config import (
    DoraConfig,
    FullConfig,
    Ia3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QloraConfig,
)
from microtune.core.errors import RecipeError

PROMPT_LEARNING = {"prompt_tuning", "prefix_tuning"}


@dataclass(frozen=True)
class MethodContext:
    seed: int
    instruction: str = ""
    base_path: str = ""


def _lora(method: LoraConfig, ctx: MethodContext) -> Any:
    from peft import LoraConfig as PeftLora
    from peft import TaskType

    return PeftLora(task_type=TaskType.CAUSAL_LM, r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                    target_modules=method.target_modules, bias="none", use_rslora=method.use_rslora,
                    use_dora=isinstance(method, DoraConfig))


def _ia3(method: Ia3Config, ctx: MethodContext) -> Any:
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=method.target_modules,
                     feedforward_modules=method.feedforward_modules)


def _prompt_tuning(method: PromptTuningConfig, ctx: MethodContext) -> Any:
    from peft import PromptTuningConfig as PeftPromptTuning
    from peft import PromptTuningInit, TaskType

    init = {"prompt_tuning_init": PromptTuningInit.RANDOM}
    if method.init_from_instruction and ctx.instruction:
        init = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": ctx.instruction,
                "tokenizer_name_or_path": ctx.base_path}
    return PeftPromptTuning(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens, **init)


def _prefix_tuning(method: PrefixTuningConfig, ctx: MethodContext) -> Any:
    from peft import PrefixTuningConfig as PeftPrefixTuning
    from peft import TaskType

    return PeftPrefixTuning(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens)


METHODS: dict[str, Callable[[Any, MethodContext], Any] | None] = {
    "lora": _lora, "dora": _lora, "qlora": _lora, "ia3": _ia3,
    "prompt_tuning": _prompt_tuning, "prefix_tuning": _prefix_tuning, "full": None,
}


def quantization_config(method: Any) -> Any:
    """The bitsandbytes 4-bit config a ``qlora`` base is loaded with (``None`` for other methods)."""
    if not isinstance(method, QloraConfig):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("method.kind: qlora needs the bitsandbytes package",
                          hint="pip install 'bitsandbytes>=0.50' (CPU and CUDA), or use method.kind: lora") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant_type,
                              bnb_4bit_use_double_quant=method.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, method.compute_dtype))


def apply_method(model: Any, method: Any, ctx: MethodContext | int) -> Any:
    """Make ``model`` trainable the way the recipe says; a ``PeftModel`` except for ``full``."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    ctx = ctx if isinstance(ctx, MethodContext) else MethodContext(seed=ctx)
    torch.manual_seed(ctx.seed)  # adapter initialisation is part of the run's seed
    if isinstance(method, FullConfig):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if isinstance(method, QloraConfig):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, METHODS[method.kind](method, ctx))
    except ValueError as exc:  # PEFT's word on a module list that does not fit this model
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise RecipeError(f"method.target_modules: PEFT cannot apply {method.kind} here: {str(exc)[:300]}",
                          hint=f"use `all-linear` or names of this model's linear layers: {names}") from None


def is_prompt_learning(kind: str) -> bool:
    return kind in PROMPT_LEARNING


def param_counts(model: Any) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}
