"""Shared fixtures: the bundled tokenizer, a tiny random Llama built from a config, recipe writers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from toydata import LABELS, TEXTS, toy_rows, write_jsonl


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled SmolLM2 converted once to safetensors (cached across runs)."""
    from microtune.config import ModelConfig
    from microtune.models import resolve_base

    return Path(resolve_base(ModelConfig()).path)


@pytest.fixture(scope="session")
def tokenizer(bundled_dir: Path) -> Any:
    from microtune.models.resolve import BaseModelRef, load_tokenizer

    return load_tokenizer(BaseModelRef("bundled", str(bundled_dir), "bundled", "x"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A 2-layer random Llama with the bundled tokenizer: a real model, seconds to train."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.3, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_recipe(tmp_path: Path):
    """Write a recipe (and by default toy train/test files) into tmp_path; returns its path. A section's key given
    as None is left out (e.g. task={"type": "generate", "labels": None}: a generate section has no labels key)."""

    def make(base: str | Path, data: dict[str, Any] | None = None, **sections: Any) -> Path:
        if data is None:
            train = write_jsonl(tmp_path / "train.jsonl", toy_rows(5))
            test = write_jsonl(tmp_path / "test.jsonl", [{"text": TEXTS[l][7], "label": l} for l in LABELS] +
                               [{"text": TEXTS[l][6], "label": l} for l in LABELS])
            data = {"train": train.name, "test": test.name, "split": {"valid": 0.0}}
        recipe = {"name": "toy", "task": {"type": "classify", "instruction": "Route the customer message.", "labels": LABELS},
                  "data": data, "model": {"base": str(base)},
                  "train": {"epochs": 2, "batch_size": 4, "max_seq_len": 96, "lr": 2e-3, "log_every": 1},
                  "eval": {"shots": 2, "batch_size": 4}}
        for key, value in sections.items():
            if isinstance(value, dict):
                recipe[key] = {k: v for k, v in {**recipe.get(key, {}), **value}.items() if v is not None}
            else:
                recipe[key] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return make
