"""Base models (resolve, load, cache) and PEFT method builders."""
from microtune.models.peft_methods import METHODS, apply_method, param_counts
from microtune.models.resolve import BaseModelRef, load_model, load_tokenizer, resolve_base

__all__ = ["METHODS", "BaseModelRef", "apply_method", "load_model", "load_tokenizer", "param_counts", "resolve_base"]
