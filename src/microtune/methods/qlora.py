"""QLoRA: the frozen base in 4-bit (bitsandbytes), LoRA on top in higher precision."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from microtune.core.errors import RecipeError
from microtune.methods import lora
from microtune.methods.base import Capabilities, MethodContext, MethodSpec


class QloraConfig(lora.LoraConfig):
    """QLoRA: the frozen base in 4-bit (bitsandbytes), LoRA on top in higher precision."""

    kind: Literal["qlora"] = Field("qlora", description="LoRA on a 4-bit quantised base (bitsandbytes ≥ 0.50; CPU or CUDA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the de-quantised matmuls. `auto` follows the weights (model.dtype): float16 where they load "
        "in float16 (a GPU without bf16), else bfloat16 where the hardware has native bf16 matmuls, float32 on a CPU without them.")


def build(method: QloraConfig, ctx: MethodContext) -> Any:
    from peft import LoraConfig as PeftLora

    return PeftLora(**lora.peft_kwargs(method), use_dora=False)


def compute_dtype(method: QloraConfig, weights: str, native_bf16: bool) -> str:
    """The matmul dtype: the recipe's, or with ``auto`` the weights' half-precision type — bf16 when they are bf16, or fp32
    weights on hardware with native bf16 matmuls (``native_bf16``: a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX;
    the caller asks ``models.hardware``) — and fp32 on a CPU without them, where a bf16 matmul is emulated: ~0.9 vs ~120
    GFLOP/s on a 2-core AVX2 host, so a bf16 QLoRA step would crawl there."""
    if method.compute_dtype != "auto":
        return method.compute_dtype
    if weights in ("float16", "bfloat16"):
        return weights
    return "bfloat16" if native_bf16 else "float32"


def quantize(method: QloraConfig, weights: str, native_bf16: bool) -> Any:
    """The bitsandbytes 4-bit config the base is loaded with (training, evaluation and serving alike); ``weights`` is the
    resolved ``model.dtype`` and ``native_bf16`` this machine's bf16 matmuls, which ``compute_dtype: auto`` follows."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("method.kind: qlora needs the bitsandbytes package",
                          hint="pip install 'bitsandbytes>=0.50' (CPU and CUDA), or use method.kind: lora") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant_type,
                              bnb_4bit_use_double_quant=method.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype(method, weights, native_bf16)))


SPEC = MethodSpec(
    kind="qlora", config=QloraConfig, build=build, quantize=quantize,
    # the adapter itself is a plain LoRA: it merges into (and vLLM serves it on) the unquantised base, and `microtune serve`
    # runs it in mixed batches on its full-precision shared base by default (`--qlora-base 4bit`: on its own 4-bit base)
    capabilities=Capabilities(prompt_learning=False, mixed_batch=True, mergeable=True, vllm_servable=True, fsdp=False,
                              packing=True, quantized_base=True, full_model=False),
    reasons={"fsdp": "FSDP cannot shard qlora's 4-bit (bitsandbytes) base weights"},
)
