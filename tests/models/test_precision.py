"""GPU-ready loading on a CPU: `model.dtype` (weights dtype, `auto` per machine) and `model.attention` (the kernel).

What needs a GPU (bf16 by default there, flash attention, NCCL) runs in benchmarks/gpu_check.sh; here the CPU
side: `auto` keeps fp32 weights, bf16 weights load and train with fp32 adapters, eager and SDPA agree,
flash_attention_2 is refused with its reason, and bad values name the choices.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from microtune.config import load_recipe, validate_recipe
from microtune.core.errors import RecipeError
from microtune.models.resolve import BaseModelRef, load_model, loaded_as

ROOT = Path(__file__).resolve().parents[2]
BANKING = ROOT / "recipes/banking-intents.yaml"


def _ref(folder: Path) -> BaseModelRef:
    return BaseModelRef("tiny", str(folder), "tiny", "x")


def _train(make_recipe, tiny_model_dir: Path, tmp_path: Path, model: dict, method: dict | None = None) -> dict:
    from microtune import pipeline
    from microtune.models import resolve_base
    from microtune.training import train_adapter

    path = make_recipe(tiny_model_dir, model=model, method=method or {"kind": "lora", "r": 4},
                       train={"max_steps": 2, "bf16": False, "batch_size": 4})
    checked = pipeline.check(path, workspace=tmp_path / "ws")
    return train_adapter(checked.recipe, resolve_base(checked.recipe.model), checked.dataset_dir, checked.manifest["labels"],
                         tmp_path / "out")


def test_auto_resolves_per_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU: fp32 (autocast does the bf16 matmuls); a bf16 GPU: bf16; an older GPU: fp16; `full` keeps fp32 master weights."""
    import torch

    from microtune.models.hardware import weights_dtype

    if not torch.cuda.is_available():
        assert weights_dtype("auto") == "float32"
    assert weights_dtype("bfloat16") == "bfloat16" and weights_dtype("float16", trains_base=True) == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rule itself, as a GPU machine would answer
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert weights_dtype("auto") == "bfloat16" and weights_dtype("auto", trains_base=True) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert weights_dtype("auto") == "float16"


def test_auto_loads_fp32_and_sdpa_on_cpu(tiny_model_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    model = load_model(_ref(tiny_model_dir))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert loaded_as(model) == {"weights_dtype": "float32", "attention": "sdpa"}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_auto_on_a_gpu_trains_half_precision_weights(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """On a GPU `auto` loads bf16 (fp16 without bf16) weights and trains them with fp32 adapters: the default there."""
    import torch

    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert loaded_as(load_model(_ref(tiny_model_dir)))["weights_dtype"] == expected
    result = _train(make_recipe, tiny_model_dir, tmp_path, {})
    assert result["cost"]["weights_dtype"] == expected and result["cost"]["device"] == "cuda"
    assert all(math.isfinite(h["loss"]) for h in result["history"])


def test_bfloat16_weights_train_with_fp32_adapters(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """bf16 base weights (half the memory) train a LoRA whose own weights stay fp32, with a finite loss; the run records it."""
    import torch

    from microtune.models import resolve_base
    from microtune.training.setup import build_model

    path = make_recipe(tiny_model_dir, model={"dtype": "bfloat16"}, method={"kind": "lora", "r": 4})
    model = build_model(load_recipe(path), resolve_base(load_recipe(path).model), to_device=False)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    result = _train(make_recipe, tiny_model_dir, tmp_path, {"dtype": "bfloat16"})
    assert all(math.isfinite(h["loss"]) for h in result["history"]) and result["final"]["steps"] == 2
    cpu_training = "short_eager" if result["cost"]["device"] == "cpu" else "sdpa"  # auto's CPU training kernel: eager short, SDPA long
    assert result["cost"]["weights_dtype"] == "bfloat16" and result["cost"]["attention"] == cpu_training


def test_auto_run_records_fp32_on_cpu(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    result = _train(make_recipe, tiny_model_dir, tmp_path, {"attention": "eager"})
    assert result["cost"]["weights_dtype"] == "float32" and result["cost"]["attention"] == "eager"


def test_eager_and_sdpa_give_the_same_logits(tiny_model_dir: Path) -> None:
    """The kernel changes speed, not answers: a left-padded batch (masked keys) through both kernels."""
    import torch

    ids = torch.tensor([[0, 0, 5, 9, 14, 3], [7, 8, 2, 11, 4, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    logits = {}
    for kernel in ("eager", "sdpa"):
        model = load_model(_ref(tiny_model_dir), dtype="float32", attention=kernel).eval()
        assert loaded_as(model)["attention"] == kernel
        with torch.no_grad():
            logits[kernel] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(logits["eager"][real], logits["sdpa"][real], atol=1e-4, rtol=1e-4)


def test_flash_attention_refused_without_cuda(tiny_model_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(RecipeError, match="flash_attention_2 cannot run here: .*CUDA") as info:
        load_model(_ref(tiny_model_dir), dtype="bfloat16", attention="flash_attention_2")
    assert "model.attention: auto" in info.value.hint


def test_flash_attention_needs_half_precision_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU with flash_attn installed, fp32 weights are still refused, and `auto` falls back to SDPA for them."""
    import importlib.util

    import torch

    from microtune.models import hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    assert "fp16/bf16" in hardware.flash_unavailable("float32")
    assert hardware.attention_impl("auto", "float32") is None and hardware.attention_impl("auto", "bfloat16") == "flash_attention_2"
    assert hardware.attention_impl("auto", "bfloat16", flash_ok=False) is None  # packed training
    with pytest.raises(RecipeError, match="resolves to float32"):
        hardware.attention_impl("flash_attention_2", "float32")


def test_bad_values_name_the_choices() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(BANKING, ["model.dtype=fp8", "model.attention=flash"])
    text = str(info.value) + " ".join(str(p) for p in info.value.problems)
    assert "model.dtype" in text and "'auto', 'float32', 'bfloat16' or 'float16'" in text
    assert "model.attention" in text and "'flash_attention_2'" in text


def test_combinations_that_cannot_train_are_refused_at_load() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(BANKING, ["model.attention=flash_attention_2", "train.packing=true"])
    assert any("block-diagonal" in str(p) and "train.packing" in str(p) for p in info.value.problems)
    full = {"name": "x", "task": {"labels": ["a", "b"], "instruction": "Pick."}, "data": {"train": "t.jsonl"}, "method": {"kind": "full"}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(full | {"model": {"dtype": "float16"}})
    assert any("loss scaling" in str(p) and "model.dtype" in str(p) for p in info.value.problems)
    assert validate_recipe(full | {"model": {"dtype": "bfloat16"}}).model.dtype == "bfloat16"  # trains, with a warning


def test_qlora_compute_dtype_follows_the_weights() -> None:
    import torch

    pytest.importorskip("bitsandbytes")  # a dependency here and in CI; not carried to the GPU check's machine (gpu_carry.py)

    from microtune.methods.qlora import QloraConfig, compute_dtype
    from microtune.models.hardware import bf16_supported
    from microtune.models.peft_methods import quantization_config

    auto = QloraConfig()
    assert compute_dtype(auto, "float32", native_bf16=True) == "bfloat16" and compute_dtype(auto, "bfloat16", False) == "bfloat16"
    assert compute_dtype(auto, "float32", native_bf16=False) == "float32"  # a CPU without AVX512-BF16: no emulated bf16 matmuls
    assert quantization_config(auto, "float32").bnb_4bit_compute_dtype == (torch.bfloat16 if bf16_supported() else torch.float32)
    assert compute_dtype(auto, "float16", True) == "float16"  # a GPU without bf16
    assert compute_dtype(QloraConfig(compute_dtype="float32"), "float16", True) == "float32"


def test_float16_weights_train_with_loss_scaling(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """float16 weights (a GPU without bf16) train with an enabled loss scaler: finite loss, the adapter's weights fp32;
    a step the scaler skips (its first scale overflows) does not advance the lr schedule (no torch warning about it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _train(make_recipe, tiny_model_dir, tmp_path, {"dtype": "float16"})
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
    assert all(math.isfinite(h["loss"]) for h in result["history"]) and result["cost"]["weights_dtype"] == "float16"
    import torch

    from microtune.training.setup import grad_scaler

    assert grad_scaler(torch.nn.Linear(2, 2).half()).is_enabled() and not grad_scaler(torch.nn.Linear(2, 2)).is_enabled()
