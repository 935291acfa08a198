"""IA3: learned per-channel scaling vectors on keys, values and the feed-forward."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from microtune.core.schema import Section
from microtune.methods.base import Capabilities, MethodContext, MethodSpec
from microtune.methods.lora import TargetModules


class Ia3Config(Section):
    """IA3: learned per-channel scaling vectors on keys, values and the feed-forward."""

    kind: Literal["ia3"] = Field("ia3", description="IA3 rescaling vectors.")
    target_modules: TargetModules | None = Field(None, description="Modules to rescale; default: PEFT's choice for the architecture.")
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward (scaled on the input); default: PEFT's choice."
    )


def build(method: Ia3Config, ctx: MethodContext) -> Any:
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=method.target_modules,
                     feedforward_modules=method.feedforward_modules)


SPEC = MethodSpec(
    kind="ia3", config=Ia3Config, build=build,
    capabilities=Capabilities(prompt_learning=False, mixed_batch=False, mergeable=True, vllm_servable=False, fsdp=True,
                              packing=True, quantized_base=False, full_model=False),
    reasons={"mixed_batch": "PEFT's mixed-adapter batches are LoRA-only",
             "vllm_servable": "vLLM serves LoRA adapters only"},
)
