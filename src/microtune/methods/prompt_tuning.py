"""Prompt tuning: trained virtual-token embeddings in front of every prompt."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from microtune.core.schema import Section
from microtune.methods.base import Capabilities, MethodContext, MethodSpec

# shared with prefix tuning: both put trained virtual tokens in front of every row
PROMPT_LEARNING_REASONS = {
    "mixed_batch": "its virtual tokens are not weights a mixed-adapter batch can switch per row",
    "mergeable": "its virtual tokens are not weights that can be merged into the model",
    "vllm_servable": "vLLM serves LoRA adapters only",
    "fsdp": "PEFT saves its prompt embeddings by running the sharded prompt encoder",
    "packing": "its virtual tokens are prepended to each row, so packed examples would share them",
}
PROMPT_LEARNING = Capabilities(prompt_learning=True, mixed_batch=False, mergeable=False, vllm_servable=False, fsdp=False,
                               packing=False, quantized_base=False, full_model=False)


class PromptTuningConfig(Section):
    """Prompt tuning: trained virtual-token embeddings in front of every prompt."""

    kind: Literal["prompt_tuning"] = Field("prompt_tuning", description="Soft prompt (virtual tokens) in the input embeddings.")
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Number of virtual tokens.")
    init_from_instruction: bool = Field(True, description="Start the virtual tokens from the embedding of the task instruction.")


def build(method: PromptTuningConfig, ctx: MethodContext) -> Any:
    from peft import PromptTuningConfig as PeftPromptTuning
    from peft import PromptTuningInit, TaskType

    init: dict[str, Any] = {"prompt_tuning_init": PromptTuningInit.RANDOM}
    if method.init_from_instruction and ctx.instruction:
        init = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": ctx.instruction,
                "tokenizer_name_or_path": ctx.base_path}
    return PeftPromptTuning(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens, **init)


SPEC = MethodSpec(kind="prompt_tuning", config=PromptTuningConfig, build=build, capabilities=PROMPT_LEARNING,
                  reasons=PROMPT_LEARNING_REASONS)
