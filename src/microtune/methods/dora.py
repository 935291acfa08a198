"""DoRA: LoRA with the weight's magnitude and direction trained apart (PEFT's ``use_dora``)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from microtune.methods import lora
from microtune.methods.base import Capabilities, MethodContext, MethodSpec


class DoraConfig(lora.LoraConfig):
    """DoRA: LoRA with the weight's magnitude and direction trained apart."""

    kind: Literal["dora"] = Field("dora", description="Weight-decomposed LoRA (DoRA).")


def build(method: DoraConfig, ctx: MethodContext) -> Any:
    from peft import LoraConfig as PeftLora

    return PeftLora(**lora.peft_kwargs(method), use_dora=True)


SPEC = MethodSpec(
    kind="dora", config=DoraConfig, build=build,
    capabilities=Capabilities(prompt_learning=False, mixed_batch=False, mergeable=True, vllm_servable=False, fsdp=True,
                              packing=True, quantized_base=False, full_model=False),
    reasons={"mixed_batch": "PEFT refuses `adapter_names` rows naming a DoRA adapter (the server runs each DoRA adapter in a batch of "
                             "its own on the shared base, with `set_adapter`)",
             "vllm_servable": "vLLM serves plain LoRA adapters, not DoRA's magnitude vectors"},
)
