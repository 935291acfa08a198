"""Base models (resolve, load, cache) and PEFT method builders."""
from microtune.models.peft_methods import (
    METHODS,
    MethodContext,
    apply_method,
    is_prompt_learning,
    param_counts,
    quantization_config,
)
from microtune.models.resolve import BaseModelRef, load_model, load_tokenizer, resolve_base

__all__ = ["METHODS", "BaseModelRef", "MethodContext", "apply_method", "is_prompt_learning", "load_model", "load_tokenizer",
           "param_counts", "quantization_config", "resolve_base"]
