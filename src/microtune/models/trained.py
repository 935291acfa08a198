"""Load a trained artifact (an `adapter/` folder) for prediction, exactly as it was trained.

    model = load_trained(base_ref, adapter_dir)            # base + adapter, or the whole model for `full`

Shared by evaluation, serving and watch: each reads the same artifact, none imports another stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import artifact_recipe
from microtune.core.artifacts import read_manifest
from microtune.models.hardware import device, weights_dtype
from microtune.models.peft_methods import quantization_config
from microtune.models.resolve import BaseModelRef, load_model


def load_trained(ref: BaseModelRef, adapter_dir: Path, base_model: Any = None) -> Any:
    """Load a trained artifact as it was trained: whole model (`full`), 4-bit base + adapter (`qlora`), or base + adapter;
    the weights in the artifact recipe's ``model.dtype`` and ``model.attention`` (``auto``: as this machine resolves them —
    a full model trained in fp32 on a GPU predicts in bf16 there, as any base does)."""
    from peft import PeftModel

    trained = artifact_recipe(Path(adapter_dir) / "recipe.json")
    method = read_manifest(adapter_dir, "adapter").get("method", "lora")
    how = {"dtype": trained.model.dtype, "attention": trained.model.attention}  # the artifact's model.dtype / model.attention
    if methods.spec(method).capabilities.full_model:
        return load_model(BaseModelRef(str(adapter_dir), str(adapter_dir), str(adapter_dir), ""), **how).to(device()).eval()
    quant = quantization_config(trained.method, weights_dtype(trained.model.dtype))
    if quant is not None or base_model is None:
        base_model = load_model(ref, trained.model.trust_remote_code, quant, quantized_cache=trained.model.quantized_cache, **how)
        base_model = base_model if quant is not None else base_model.to(device())
    return PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
