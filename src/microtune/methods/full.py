"""Full fine-tuning: every weight trains; the reference the PEFT methods are measured against."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from microtune.core.schema import Section
from microtune.methods.base import Capabilities, MethodSpec


class FullConfig(Section):
    """Full fine-tuning: every weight trains; the reference PEFT methods are measured against."""

    kind: Literal["full"] = Field("full", description="Train every parameter (writes a whole model, not an adapter).")


# no builder: nothing is wrapped, every parameter is made trainable (models.peft_methods.apply_method)
SPEC = MethodSpec(
    kind="full", config=FullConfig, build=None,
    capabilities=Capabilities(prompt_learning=False, mixed_batch=False, mergeable=False, vllm_servable=False, fsdp=True,
                              packing=True, quantized_base=False, full_model=True),
    reasons={"mixed_batch": "it writes a whole model, not an adapter that can share the server's base",
             "mergeable": "it writes a whole model already: there is no adapter to merge",
             "vllm_servable": "it writes a whole model, not a LoRA adapter (serve its folder as the model itself)"},
)
