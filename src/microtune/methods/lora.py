"""LoRA: low-rank updates on the chosen linear layers; rank-stabilised scaling with ``use_rslora``."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from microtune.core.schema import Section
from microtune.methods.base import Capabilities, MethodContext, MethodSpec

TargetModules = list[str] | Literal["all-linear"]


class LoraConfig(Section):
    """LoRA: low-rank updates on the chosen linear layers (`dora` and `qlora` add to it)."""

    kind: Literal["lora"] = Field("lora", description="PEFT method: lora | dora | qlora | ia3 | prompt_tuning | prefix_tuning | full.")
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input; costs ~25% of a CPU training step (random masks), so off by default."
    )
    target_modules: TargetModules = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear`."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r), steadier at high rank.")


def peft_kwargs(method: LoraConfig) -> dict[str, Any]:
    """The flat PEFT ``LoraConfig`` arguments of a LoRA-family section (DoRA and QLoRA reuse them)."""
    from peft import TaskType

    return {"task_type": TaskType.CAUSAL_LM, "r": method.r, "lora_alpha": method.alpha, "lora_dropout": method.dropout,
            "target_modules": method.target_modules, "bias": "none", "use_rslora": method.use_rslora}


def build(method: LoraConfig, ctx: MethodContext) -> Any:
    from peft import LoraConfig as PeftLora

    return PeftLora(**peft_kwargs(method), use_dora=False)


SPEC = MethodSpec(
    kind="lora", config=LoraConfig, build=build,
    capabilities=Capabilities(prompt_learning=False, mixed_batch=True, mergeable=True, vllm_servable=True, fsdp=True,
                              packing=True, quantized_base=False, full_model=False),
)
