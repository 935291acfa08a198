"""Sibling LoRA layers fused for training (training/fuse.py): q/k/v and gate/up as one matmul each for the base, the LoRA A
and the LoRA B weights. The loss and every LoRA gradient are PEFT's own; the adapter saved is PEFT's; layers fusion
cannot reproduce exactly (dropout, DoRA, a 4-bit base) keep PEFT's path."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.config import load_recipe


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("microtune.models.hardware.device", lambda: "cpu")


def _build(make_recipe, tiny_model_dir: Path, method: dict, bf16: bool, fuse: bool, model: dict | None = None):
    import torch

    from microtune.models import resolve_base
    from microtune.training.fuse import fuse_siblings
    from microtune.training.setup import build_model, precast

    recipe = load_recipe(make_recipe(tiny_model_dir, model=model or {}, method=method, train={"bf16": bf16}))
    model = build_model(recipe, resolve_base(recipe.model))
    precast(recipe, model)
    generator = torch.Generator().manual_seed(1)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:  # PEFT starts B at zero: random B so that every gradient, A's included, is non-zero
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    groups = fuse_siblings(model) if fuse else 0
    return model, groups


def _loss_and_grads(model, bf16: bool):
    import torch

    from microtune.training.batching import collate
    from microtune.training.loss import completion_loss

    batch = collate([([1, 5, 9, 14, 3], [22, 7]), ([1, 5, 9, 30], [41, 8, 2]), ([1, 6, 9], [3])], pad_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = completion_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _worst(grads: dict, reference: dict) -> float:
    return max(float((grads[n] - reference[n]).abs().max() / reference[n].abs().max()) for n in reference)


def test_fused_siblings_give_peft_loss_and_gradients(make_recipe, tiny_model_dir: Path) -> None:
    """fp32: PEFT's loss and gradients up to float rounding (worst relative error < 1e-5). Under bf16 autocast both paths
    round to bf16, in different places (a group's outputs once, not each layer's): against the fp32 gradients the fused
    path is as close as PEFT's own (within 1.5× of PEFT's error, which the test prints)."""
    method = {"kind": "lora", "r": 4, "alpha": 8}
    runs = {}
    for bf16 in (False, True):
        for fuse in (False, True):
            model, groups = _build(make_recipe, tiny_model_dir, method, bf16, fuse)
            assert groups == (4 if fuse else 0)  # 2 layers × (q/k/v, gate/up)
            runs[bf16, fuse] = _loss_and_grads(model, bf16)
    (loss_ref, ref), (loss_fused, fused) = runs[False, False], runs[False, True]
    assert len(ref) == 2 * 7 * 2 and fused.keys() == ref.keys()  # A and B of 7 layers, 2 decoder layers
    assert min(float(g.abs().max()) for g in ref.values()) > 0
    assert loss_fused == pytest.approx(loss_ref, rel=1e-6) and _worst(fused, ref) < 1e-5
    peft_bf16, fused_bf16 = _worst(runs[True, False][1], ref), _worst(runs[True, True][1], ref)
    print(f"worst relative gradient error vs fp32: PEFT bf16 {peft_bf16:.2e}, fused bf16 {fused_bf16:.2e}")
    assert fused_bf16 < 1.5 * peft_bf16
    assert runs[True, True][0] == pytest.approx(loss_ref, rel=1e-2)


def test_bf16_weights_without_autocast_run_the_lora_path_in_fp32_as_peft_does(make_recipe, tiny_model_dir: Path) -> None:
    """``model.dtype: bfloat16`` without autocast: PEFT runs the LoRA path in the adapter's fp32 and adds it to the bf16 base
    output; the fused group does the same (the base matmul's rows are the same bf16 dot products)."""
    import torch

    runs = []
    for fuse in (False, True):
        model, groups = _build(make_recipe, tiny_model_dir, {"kind": "lora", "r": 4}, False, fuse, model={"dtype": "bfloat16"})
        assert groups == (4 if fuse else 0)
        assert {p.dtype for n, p in model.named_parameters() if "base_layer" in n} == {torch.bfloat16}
        runs.append(_loss_and_grads(model, bf16=False))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    print(f"bf16 weights, no autocast: loss {loss_a:.6f} vs {loss_b:.6f}, worst relative gradient difference {_worst(grads_b, grads_a):.1e}")
    assert loss_b == pytest.approx(loss_a, rel=1e-2) and _worst(grads_b, grads_a) < 5e-2


def test_fused_weights_are_views_and_the_adapter_is_peft_s(make_recipe, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The base weights of a group share one tensor (no extra memory); the saved adapter loads back into a plain PEFT model
    and gives the fused model's outputs."""
    import torch
    from peft import PeftModel

    from microtune.models import load_model, resolve_base

    fused, _ = _build(make_recipe, tiny_model_dir, {"kind": "lora", "r": 4}, bf16=False, fuse=True)
    attention = fused.get_base_model().model.layers[0].self_attn
    q, k = attention.q_proj.base_layer.weight, attention.k_proj.base_layer.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    fused.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    plain = PeftModel.from_pretrained(load_model(resolve_base(load_recipe(make_recipe(tiny_model_dir)).model)), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("method", [{"kind": "lora", "r": 4, "dropout": 0.1}, {"kind": "dora", "r": 4}, {"kind": "qlora", "r": 4}])
def test_layers_fusion_would_change_keep_peft_s_path(make_recipe, tiny_model_dir: Path, method: dict) -> None:
    """Dropout (PEFT draws a mask per layer), DoRA (a norm per layer) and a 4-bit base are left as PEFT runs them."""
    if method["kind"] == "qlora":
        pytest.importorskip("bitsandbytes")
    _, groups = _build(make_recipe, tiny_model_dir, method, bf16=True, fuse=True)
    assert groups == 0


def test_a_sibling_called_alone_or_with_adapters_off_runs_peft_s_forward(make_recipe, tiny_model_dir: Path) -> None:
    """Fusion serves a group's outputs only for the same input tensor: another input, or adapters disabled, is PEFT's."""
    import torch

    fused, _ = _build(make_recipe, tiny_model_dir, {"kind": "lora", "r": 4}, bf16=False, fuse=True)
    plain, _ = _build(make_recipe, tiny_model_dir, {"kind": "lora", "r": 4}, bf16=False, fuse=False)
    layer_f = fused.get_base_model().model.layers[0].self_attn
    layer_p = plain.get_base_model().model.layers[0].self_attn
    x, y = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.allclose(layer_f.q_proj(x), layer_p.q_proj(x), atol=1e-6)
        assert torch.allclose(layer_f.k_proj(y), layer_p.k_proj(y), atol=1e-6)  # not q's input: computed afresh
        assert torch.allclose(layer_f.v_proj(x), layer_p.v_proj(x), atol=1e-6)
        with fused.disable_adapter(), plain.disable_adapter():
            assert torch.allclose(layer_f.q_proj(x), layer_p.q_proj(x), atol=1e-6)
