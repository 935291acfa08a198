"""Make a base model trainable the way ``recipe.method`` says; the per-method logic is in ``microtune.methods``.

    model = apply_method(base_model, recipe.method, MethodContext(seed=13, instruction=..., base_path=...))

Each method's module builds its PEFT config from its recipe section; this module only dispatches on
the method's capability flags: a ``full_model`` method wraps nothing and trains every weight, a
``quantized_base`` method has its base loaded in 4-bit first (``quantization_config``).
"""
from __future__ import annotations

from typing import Any

import microtune.methods as methods
from microtune.core.errors import RecipeError
from microtune.methods import MethodContext

__all__ = ["MethodContext", "apply_method", "is_prompt_learning", "param_counts", "quantization_config"]


def quantization_config(method: Any, weights: str = "float32") -> Any:
    """The bitsandbytes 4-bit config a ``quantized_base`` method's base is loaded with (``None`` for other methods);
    ``weights`` is the resolved dtype of the modules left unquantised, which the matmul dtype may follow, as it may this
    machine's native bf16 matmuls."""
    from microtune.models.hardware import bf16_supported

    quantize = methods.spec(method.kind).quantize
    return quantize(method, weights, bf16_supported()) if quantize is not None else None


def apply_method(model: Any, method: Any, ctx: MethodContext | int) -> Any:
    """Make ``model`` trainable the way the recipe says; a ``PeftModel`` except for a ``full_model`` method."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    spec = methods.spec(method.kind)
    ctx = ctx if isinstance(ctx, MethodContext) else MethodContext(seed=ctx)
    torch.manual_seed(ctx.seed)  # adapter initialisation is part of the run's seed
    if spec.capabilities.full_model:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.capabilities.quantized_base:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_differentiable(model)
        outputs_in_autocast_dtype(model)
    try:
        peft_model = get_peft_model(model, spec.build(method, ctx))
    except ValueError as exc:  # PEFT's word on a module list that does not fit this model
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise RecipeError(f"method.target_modules: PEFT cannot apply {method.kind} here: {str(exc)[:300]}",
                          hint=f"use `all-linear` or names of this model's linear layers: {names}") from None
    trainable_in_fp32(peft_model)
    return peft_model


def trainable_in_fp32(model: Any) -> int:
    """Hold every trainable tensor of an adapter in fp32, whatever dtype the frozen base loaded in; returns how many were cast.

    With bf16/fp16 base weights (``model.dtype`` on a GPU) the adapter must still train in fp32: AdamW updates of a
    LoRA matrix are far below bf16's precision, and fp16 gradients overflow. PEFT already up-casts its own adapter
    layers (``autocast_adapter_dtype``); this also covers what it copies from the base (``modules_to_save``)."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            cast += 1
    return cast


def keep_4bit_differentiable(model: Any) -> int:
    """Stop bitsandbytes from re-packing 4-bit weights for CPU inference in a model that trains; returns how many layers.

    On a CPU with AVX512-BF16, a ``Linear4bit`` forward in eval mode without gradients (a validation pass)
    rewrites its weight, for good, into a packed layout whose matmul (``gemv_4bit``) has no autograd
    kernel: every later training step's backward through it is silently wrong (LoRA gradients off by
    ~100 %, tests/methods/test_qlora_gradients.py). A model that trains keeps the differentiable layout;
    prediction-only models (eval, serve) still get the fast packed one."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def outputs_in_autocast_dtype(model: Any) -> int:
    """Make every 4-bit linear layer of a model that trains return autocast's dtype while autocast is on; returns how many.

    bitsandbytes casts a ``Linear4bit`` output back to its input's dtype: the fp32 residual stream's, so under bf16
    autocast each layer's q/k/v, gate and up outputs came back fp32, and the attention and MLP kept them for backward
    at twice the size of a LoRA model's (an ``nn.Linear`` under autocast returns bf16): with the LM head's cast, a 1.7B
    model's step at 512 tokens peaked 800 MiB higher (BENCHMARKS.md). The hook hands on the output in autocast's
    dtype, as ``nn.Linear`` would; without autocast it changes nothing (tests/methods/test_qlora_gradients.py counts
    the bytes each keeps)."""
    import torch
    from bitsandbytes.nn import Linear4bit

    def to_autocast_dtype(module: Any, args: Any, out: Any) -> Any:
        kind = out.device.type
        return out.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else None

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.register_forward_hook(to_autocast_dtype)
    return len(layers)


def is_prompt_learning(kind: str) -> bool:
    return methods.spec(kind).capabilities.prompt_learning


def param_counts(model: Any) -> dict[str, int]:
    """Trainable and total parameters of the architecture: an LM head tied to the input embeddings counts once, also
    where training holds its own bf16 copy of it (``training.setup.frozen_linears_to_bf16``)."""
    params = {id(p): p for p in model.parameters()}
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and embeddings is not None and head.weight is not embeddings.weight and not head.weight.requires_grad:
            params.pop(id(head.weight), None)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    return {"trainable_params": trainable, "total_params": total}
