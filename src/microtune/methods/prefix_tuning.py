"""Prefix tuning: trained key/value prefixes in every attention layer."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from microtune.core.schema import Section
from microtune.methods.base import MethodContext, MethodSpec
from microtune.methods.prompt_tuning import PROMPT_LEARNING, PROMPT_LEARNING_REASONS


class PrefixTuningConfig(Section):
    """Prefix tuning: trained key/value prefixes in every attention layer."""

    kind: Literal["prefix_tuning"] = Field("prefix_tuning", description="Trained key/value prefixes per layer.")
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Length of the prefix.")


def build(method: PrefixTuningConfig, ctx: MethodContext) -> Any:
    from peft import PrefixTuningConfig as PeftPrefixTuning
    from peft import TaskType

    return PeftPrefixTuning(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=method.num_virtual_tokens)


SPEC = MethodSpec(kind="prefix_tuning", config=PrefixTuningConfig, build=build, capabilities=PROMPT_LEARNING,
                  reasons=PROMPT_LEARNING_REASONS)
