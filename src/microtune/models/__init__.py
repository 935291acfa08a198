"""Base models (resolve, load, cache), PEFT methods applied to them, trained-artifact loading, constrained decoding
(labels: decoding.py; batched generation with per-row JSON constraints: generation.py, constrain.py)."""
from microtune.models.decoding import LabelPredictor, build_trie, common_prefix
from microtune.models.generation import BatchGenerator, Finished, GenRequest, TextGenerator
from microtune.models.peft_methods import (
    MethodContext,
    apply_method,
    is_prompt_learning,
    param_counts,
    quantization_config,
)
from microtune.models.resolve import BaseModelRef, load_model, load_tokenizer, loaded_as, resolve_base
from microtune.models.trained import load_trained

__all__ = ["BaseModelRef", "BatchGenerator", "Finished", "GenRequest", "LabelPredictor", "MethodContext", "apply_method", "build_trie",
           "common_prefix", "is_prompt_learning", "load_model", "load_tokenizer", "loaded_as", "load_trained", "param_counts", "quantization_config",
           "resolve_base", "TextGenerator"]
