"""The 4-bit copy of a base model (QLoRA): quantised once, kept under $MICROTUNE_CACHE/quantized, loaded from there after.

The copy must be the model a fresh quantisation gives — the same packed weights, quantisation states and logits — and a
damaged copy must cost a re-quantisation, never a wrong model."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")


def _load(tiny_model_dir: Path, cache: bool = True):
    from microtune.methods import QloraConfig
    from microtune.models import BaseModelRef, load_model, quantization_config

    ref = BaseModelRef("tiny", str(tiny_model_dir), "tiny", "")
    return ref, load_model(ref, quantization_config=quantization_config(QloraConfig(kind="qlora")), quantized_cache=cache)


def _state(model) -> dict:
    """Every 4-bit layer's packed weight and quantisation state (absmax, nested absmax, code), as plain tensors."""
    import bitsandbytes as bnb

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            out[name] = [module.weight.data.clone(), qs.absmax.clone(), qs.code.clone()] + \
                ([qs.state2.absmax.clone(), qs.offset.clone()] if qs.nested else [])
    return out


def test_the_second_load_reads_the_cached_copy_and_is_the_same_model(tiny_model_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("MICROTUNE_CACHE", str(tmp_path / "cache"))
    _, fresh = _load(tiny_model_dir)
    (copy,) = (tmp_path / "cache" / "quantized").iterdir()
    assert (copy / "config.json").is_file() and list(copy.glob("*.safetensors"))
    ref, cached = _load(tiny_model_dir)
    assert cached.name_or_path == ref.path  # PEFT writes this into an adapter: the base, not the cache folder
    a, b = _state(fresh), _state(cached)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert all(torch.equal(x, y) for x, y in zip(a[name], b[name])), name
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, cached(input_ids=ids).logits)


def test_no_copy_when_switched_off_and_a_damaged_copy_is_quantised_again(tiny_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import torch

    monkeypatch.setenv("MICROTUNE_CACHE", str(tmp_path / "cache"))
    _, plain = _load(tiny_model_dir, cache=False)
    assert not (tmp_path / "cache" / "quantized").exists()
    _load(tiny_model_dir)
    (copy,) = (tmp_path / "cache" / "quantized").iterdir()
    for weights in copy.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])  # truncated: the header promises more than the file holds
    with caplog.at_level(logging.WARNING):
        _, again = _load(tiny_model_dir)
    assert "did not load" in caplog.text
    a, b = _state(plain), _state(again)
    assert all(torch.equal(x, y) for name in a for x, y in zip(a[name], b[name]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, healed = _load(tiny_model_dir)  # the damaged copy was replaced by a good one
    assert "did not load" not in caplog.text
    assert all(torch.equal(x, y) for name in a for x, y in zip(a[name], _state(healed)[name]))


def test_the_switch_is_not_part_of_the_recipe_hash(make_recipe, tiny_model_dir: Path) -> None:
    from microtune.config import load_recipe
    from microtune.pipeline.lineage import recipe_hash

    path = make_recipe(tiny_model_dir, method={"kind": "qlora", "r": 4})
    assert recipe_hash(load_recipe(path)) == recipe_hash(load_recipe(path, ["model.quantized_cache=false"]))
