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
    compute_dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="Dtype of the de-quantised matmuls.")


def build(method: QloraConfig, ctx: MethodContext) -> Any:
    from peft import LoraConfig as PeftLora

    return PeftLora(**lora.peft_kwargs(method), use_dora=False)


def quantize(method: QloraConfig) -> Any:
    """The bitsandbytes 4-bit config the base is loaded with (training, evaluation and serving alike)."""
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


SPEC = MethodSpec(
    kind="qlora", config=QloraConfig, build=build, quantize=quantize,
    # the adapter itself is a plain LoRA: it merges into (and vLLM serves it on) the unquantised base, and `microtune serve`
    # runs it in mixed batches on its full-precision shared base by default (`--qlora-base 4bit`: on its own 4-bit base)
    capabilities=Capabilities(prompt_learning=False, mixed_batch=True, mergeable=True, vllm_servable=True, fsdp=False,
                              packing=True, quantized_base=True, full_model=False),
    reasons={"fsdp": "FSDP cannot shard qlora's 4-bit (bitsandbytes) base weights"},
)
