"""Base-model resolution: bundled alias, folders, GGUF files, hub ids — and errors that say what to do."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.config import ModelConfig
from microtune.core.errors import ModelError, RecipeError
from microtune.models import resolve_base


def test_bundled_alias_is_cached_safetensors(bundled_dir: Path) -> None:
    ref = resolve_base(ModelConfig(base="smollm2-135m-instruct"))
    assert Path(ref.path) == bundled_dir
    assert (bundled_dir / "model.safetensors").is_file() and (bundled_dir / "tokenizer.json").is_file()
    assert ref.source_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and len(ref.source_hash) == 64


def test_local_folder(tiny_model_dir: Path) -> None:
    ref = resolve_base(ModelConfig(base=str(tiny_model_dir)))
    assert ref.path == str(tiny_model_dir) and ref.lineage()["base_model_hash"]


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_base(ModelConfig(base=str(tmp_path)))


def test_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_base(ModelConfig(base=str(tmp_path / "model.gguf")))


def test_unreachable_hub_id_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as info:
        resolve_base(ModelConfig(base="someone/not-cached-model"))
    assert "cannot be reached" in info.value.message
    assert "hf download someone/not-cached-model --local-dir DIR" in info.value.hint
    assert info.value.exit_code == 2


def test_nonsense_base() -> None:
    with pytest.raises(ModelError, match="not a bundled alias, a folder, a .gguf file or a hub id"):
        resolve_base(ModelConfig(base="./nowhere/at/all"))


def test_wrong_target_modules_names_the_real_ones(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from microtune.config import LoraConfig
    from microtune.models import apply_method

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(RecipeError) as info:
        apply_method(model, LoraConfig(target_modules=["qkv"]), 0)
    assert "q_proj" in info.value.hint and "method.target_modules" in info.value.message
