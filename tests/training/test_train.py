"""The training engine on a tiny random Llama: the loss is right, it goes down, only LoRA weights move."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from microtune.config import load_recipe
from microtune.training.batching import batches_per_epoch, collate, epoch_batches, iterate_batches
from microtune.training.engine import completion_loss


def test_collate_masks_prompt_and_padding() -> None:
    batch = collate([([5, 6, 7], [8, 9]), ([5], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_bucketing_covers_every_example_once_and_is_seeded() -> None:
    lengths = [i % 17 + 3 for i in range(103)]
    batches = epoch_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert batches == epoch_batches(lengths, 8, seed=1) != epoch_batches(lengths, 8, seed=2)
    assert batches != epoch_batches(lengths, 8, seed=1, epoch=1)
    assert batches_per_epoch(103, 8) == len(batches) == 13
    run = list(iterate_batches(lengths, 8, seed=1, total=32))
    assert [e for e, _ in run] == [0] * 13 + [1] * 13 + [2] * 6
    assert run[20:] == list(iterate_batches(lengths, 8, seed=1, total=32, start=20))  # resume mid-epoch


def test_completion_loss_equals_full_forward_loss(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate([([11, 12, 13, 14], [15, 16]), ([21, 22], [23, 24, 25])], pad_id=0)
    with torch.no_grad():
        ours, n = completion_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                      batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert n == 5
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.slow
def test_train_moves_only_lora_and_lowers_loss(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    from microtune import pipeline

    recipe = make_recipe(tiny_model_dir, train={"epochs": 8, "lr": 2e-2, "log_every": 1})
    adapter = pipeline.train(recipe, workspace=tmp_path / "ws")
    manifest = json.loads((adapter / "manifest.json").read_text())
    losses = [h["loss"] for h in manifest["history"]]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) > 0 for v in lora_b)  # B starts at zero: training moved it
    assert manifest["cost"]["trainable_params"] < manifest["cost"]["total_params"]
    assert manifest["cost"]["tokens_seen"] > 0
    lineage = manifest["lineage"]
    assert lineage["dataset_hash"] and lineage["base_model_hash"] and lineage["chat_template_hash"]
    assert (adapter / "tokenizer.json").is_file() and (adapter / "recipe.json").is_file()
    assert load_recipe(recipe).train.seed == lineage["seed"]


@pytest.mark.slow
def test_training_is_seeded(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    from microtune import pipeline

    recipe = make_recipe(tiny_model_dir, train={"epochs": 1})
    a = load_file(pipeline.train(recipe, workspace=tmp_path / "a") / "adapter_model.safetensors")
    b = load_file(pipeline.train(recipe, workspace=tmp_path / "b") / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_failed_training_leaves_no_adapter(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline
    from microtune.core.errors import RecipeError

    recipe = make_recipe(tiny_model_dir, method={"target_modules": ["no_such_module"]})
    with pytest.raises(RecipeError, match="method.target_modules") as info:
        pipeline.train(recipe, workspace=tmp_path / "ws")
    assert info.value.exit_code == 2
    adapters = tmp_path / "ws" / "toy" / "adapters"
    assert not adapters.exists() or not list(adapters.iterdir())  # not even a temp folder


def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from microtune.config import LoraConfig
    from microtune.models import apply_method
    from microtune.training.engine import shared_prefix_len

    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4), 0)
    prefix = [5, 6, 7, 8, 9, 10]
    batch = collate([(prefix + [11, 12], [13, 14]), (prefix + [21], [22, 23, 24]), (prefix + [31, 32, 33], [34])], pad_id=0)
    assert shared_prefix_len(batch) == 6
    results = []
    for share in (True, False):
        model.zero_grad()
        loss, n = completion_loss(model, batch, share_prefix=share)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((loss.item(), n, grads))
    (shared, n1, g1), (plain, n2, g2) = results
    assert n1 == n2 == 6 and shared == pytest.approx(plain, rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for key in g1:
        assert torch.allclose(g1[key], g2[key], atol=1e-4, rtol=1e-3), key  # summation order only


@pytest.mark.slow
def test_tracking_uri_does_not_leak_between_workspaces(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    import os

    from microtune import pipeline

    recipe = make_recipe(tiny_model_dir, train={"max_steps": 1})
    pipeline.train(recipe, workspace=tmp_path / "a")
    assert "MLFLOW_TRACKING_URI" not in os.environ or os.environ["MLFLOW_TRACKING_URI"] != f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    pipeline.train(recipe, workspace=tmp_path / "b")
    assert (tmp_path / "b" / "mlflow.db").is_file()
