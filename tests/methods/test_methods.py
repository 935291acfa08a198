"""Every fine-tuning method trains a tiny model and changes only its own parameters."""
from __future__ import annotations

from pathlib import Path

import pytest

from microtune.config import load_recipe
from microtune.models import resolve_base
from microtune.training.batching import collate
from microtune.training.engine import build_model, completion_loss
from toydata import TINY_METHODS

METHODS = TINY_METHODS | {"lora": {"kind": "lora", "r": 4, "use_rslora": True}}  # rslora rides along
SLOW = {"prompt_tuning", "prefix_tuning", "full"}  # over ~5 s each on a 2-core CPU


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in METHODS])
def test_method_changes_only_its_parameters(kind: str, make_recipe, tiny_model_dir: Path) -> None:
    import torch

    recipe = load_recipe(make_recipe(tiny_model_dir, method=METHODS[kind]))
    model = build_model(recipe, resolve_base(recipe.model))
    batch = collate([([11, 12, 13, 14, 15], [16, 17]), ([21, 22, 23], [24, 25, 26])], pad_id=0)
    with torch.no_grad():  # bitsandbytes packs 4-bit weights on first use: compare from there on
        completion_loss(model, batch)
    before = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameters"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss, _ = completion_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, f"{kind}: nothing moved"
    assert changed <= trainable, f"{kind}: frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert losses[-1] < losses[0]
    if kind == "full":
        assert trainable == set(before)
    else:
        assert len(trainable) < len(before)


def test_qlora_base_is_4bit(make_recipe, tiny_model_dir: Path) -> None:
    recipe = load_recipe(make_recipe(tiny_model_dir, method=METHODS["qlora"]))
    model = build_model(recipe, resolve_base(recipe.model))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds


def test_method_specific_keys_are_checked(make_recipe, tiny_model_dir: Path) -> None:
    from microtune.core.errors import RecipeError

    with pytest.raises(RecipeError, match="method.r: unknown key 'r'"):
        load_recipe(make_recipe(tiny_model_dir, method={"kind": "ia3", "r": 8}))
    with pytest.raises(RecipeError, match="unknown kind 'lorra'; did you mean 'lora'"):
        load_recipe(make_recipe(tiny_model_dir, method={"kind": "lorra"}))


@pytest.mark.parametrize("kind", ["prompt_tuning", "full", "qlora"])
@pytest.mark.slow
def test_train_and_eval_end_to_end_per_method(kind: str, tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """Non-LoRA methods go through train → eval: every answer is still a valid label."""
    import json

    from microtune import pipeline

    recipe = make_recipe(tiny_model_dir, method=METHODS[kind], train={"max_steps": 3})
    adapter = pipeline.train(recipe, workspace=tmp_path / "ws")
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["method"] == kind and manifest["final"]["steps"] == 3
    evaluation = pipeline.evaluate(recipe, workspace=tmp_path / "ws", adapter=adapter)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["micro"]["valid_rate"] == 1.0
