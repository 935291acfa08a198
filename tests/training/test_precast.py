"""Frozen linear weights held in bf16 on a CPU (``model.dtype: auto`` with bf16 autocast): the copy autocast would make
every forward, made once. Same loss and LoRA gradients as fp32 weights; adapters, embeddings and ``full`` stay fp32."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.config import load_recipe


def _build(make_recipe, tiny_model_dir: Path, model: dict | None = None, method: dict | None = None, bf16: bool = True):
    from microtune.models import resolve_base
    from microtune.training.setup import build_model

    path = make_recipe(tiny_model_dir, model=model or {}, method=method or {"kind": "lora", "r": 4}, train={"bf16": bf16})
    recipe = load_recipe(path)
    return build_model(recipe, resolve_base(recipe.model))


def _dtypes(model, frozen: bool, linear: bool) -> set:
    """Dtypes of the frozen (or trainable) parameters of plain linear layers (or of every other module); the LM head,
    tied to the input embeddings, counts as an embedding."""
    import torch

    head = model.get_output_embeddings()
    return {p.dtype for m in model.modules() if (type(m) is torch.nn.Linear and m is not head) == linear
            for p in m.parameters(recurse=False) if p.requires_grad != frozen}


@pytest.fixture(autouse=True)
def _cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("microtune.models.hardware.device", lambda: "cpu")


def test_auto_holds_frozen_linears_in_bf16_adapters_fp32(make_recipe, tiny_model_dir: Path) -> None:
    import torch

    model = _build(make_recipe, tiny_model_dir)
    assert _dtypes(model, frozen=True, linear=True) == {torch.bfloat16}  # q/k/v/o/gate/up/down base layers
    assert _dtypes(model, frozen=False, linear=True) == {torch.float32}  # LoRA A/B
    assert _dtypes(model, frozen=True, linear=False) == {torch.float32}  # embeddings (and the tied LM head), norms


@pytest.mark.parametrize("model, method, bf16", [({"dtype": "float32"}, None, True), ({}, None, False),
                                                 ({}, {"kind": "full"}, True), ({}, {"kind": "dora", "r": 4}, True)])
def test_fp32_kept_where_the_cast_would_change_numbers(make_recipe, tiny_model_dir: Path, model, method, bf16) -> None:
    """Opted out (float32), no autocast to match, full fine-tuning (fp32 master weights), DoRA (reads the base weight)."""
    import torch

    built = _build(make_recipe, tiny_model_dir, model, method, bf16)
    assert {p.dtype for p in built.parameters()} == {torch.float32}


def test_same_loss_and_gradients_as_fp32_weights(make_recipe, tiny_model_dir: Path) -> None:
    """Bit-for-bit the matmuls autocast runs with fp32 weights: the loss and every LoRA gradient agree."""
    import torch

    from microtune.training.batching import collate
    from microtune.training.loss import completion_loss

    batch = collate([([1, 5, 9, 14, 3], [22, 7]), ([1, 5, 9, 30], [41, 8, 2])], pad_id=0)
    out = []
    for model in ({}, {"dtype": "float32"}):
        built = _build(make_recipe, tiny_model_dir, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = completion_loss(built, batch)
        loss.backward()
        out.append((loss.item(), {n: p.grad for n, p in built.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = out
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name
