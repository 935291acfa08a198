"""Padding-free packing: rows respect capacity, no example attends to another, loss and gradients equal padded rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from microtune.training.batching import collate
from microtune.training.engine import completion_loss
from microtune.training.packing import block_mask, first_fit, pack, packed_hidden_states

PREFIX = [5, 6, 7, 8, 9, 10]
EXAMPLES = [(PREFIX + [11, 12], [13, 14]), (PREFIX + [21], [22, 23, 24]), (PREFIX + [31, 32, 33], [34]),
            (PREFIX + [41, 42, 43, 44, 45], [46, 47])]


def _lora_model(tiny_model_dir: Path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    from microtune.config import LoraConfig
    from microtune.models import apply_method

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn)
    return apply_method(base, LoraConfig(r=4), 0)


def test_first_fit_respects_capacity_and_keeps_every_example() -> None:
    lengths = [7, 3, 9, 2, 5, 5, 1, 12]
    rows = first_fit(lengths, capacity=12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 4  # 44 tokens in rows of 12: the fewest possible
    assert first_fit([20, 3], capacity=8) == [[0], [1]]  # a longer example gets a row of its own


def test_layout_positions_restart_and_labels_stay_on_completions() -> None:
    batch = pack(EXAMPLES, pad_id=0, capacity=64)
    assert batch["prefix_ids"].tolist() == [PREFIX[:6]]  # every prompt keeps at least one own token
    assert batch["input_ids"].shape[0] == 1  # 4 short suffixes fit one row: no padding at all
    seq, pos = batch["seq_ids"][0].tolist(), batch["position_ids"][0].tolist()
    starts = [i for i in range(len(seq)) if i == 0 or seq[i] != seq[i - 1]]
    assert all(pos[i] == 6 for i in starts)  # positions restart after the shared prefix for every example
    labelled = sorted(t for t in batch["labels"][0].tolist() if t != -100)
    assert labelled == sorted(t for _, c in EXAMPLES for t in c)
    assert all(batch["labels"][0, i] == -100 for i in starts)  # a boundary never carries a label
    assert int(batch["n_tokens"]) == sum(len(p) + len(c) for p, c in EXAMPLES)


def test_block_mask_is_causal_within_an_example_only() -> None:
    import torch

    mask = block_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]), prefix=3)[0, 0]
    assert mask[:, :3].all()  # everyone sees the shared prefix
    suffix = mask[:, 3:].int().tolist()
    assert suffix == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                      [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_example_attends_to_another(tiny_model_dir: Path, attn: str) -> None:
    """Each example's hidden states in a packed row equal those of the example run alone; changing a neighbour changes nothing."""
    import torch

    model = _lora_model(tiny_model_dir, attn).eval()
    decoder = model.get_base_model().get_decoder()
    with torch.no_grad():
        batch = pack(EXAMPLES, pad_id=0, capacity=64)
        hidden = packed_hidden_states(decoder, batch)[0]
        altered = pack([EXAMPLES[0], (PREFIX + [99], [98, 97, 96]), *EXAMPLES[2:]], pad_id=0, capacity=64)
        hidden_altered = packed_hidden_states(decoder, altered)[0]
        for k, (prompt, completion) in enumerate(EXAMPLES, start=1):
            alone = decoder(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0, 6:]
            cols = (batch["seq_ids"][0] == k).nonzero().flatten()
            assert torch.allclose(hidden[cols], alone, atol=1e-5), f"example {k} differs from running alone"
            if k != 2:  # the neighbours of the altered example are untouched
                assert torch.allclose(hidden_altered[(altered["seq_ids"][0] == k).nonzero().flatten()], hidden[cols], atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_packed_loss_and_gradients_equal_padded_rows(tiny_model_dir: Path, weighted: bool) -> None:
    import torch

    model = _lora_model(tiny_model_dir)
    weights = [2.0, 0.5, 1.0, 1.5] if weighted else None
    results = []
    for batch in (collate(EXAMPLES, 0, weights), pack(EXAMPLES, 0, capacity=12, weights=weights)):
        model.zero_grad()
        loss, norm = completion_loss(model, batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((loss.item(), norm, grads))
    (padded, n1, g1), (packed, n2, g2) = results
    assert pack(EXAMPLES, 0, capacity=12)["input_ids"].shape[0] > 1  # several rows, the last one padded
    assert n1 == pytest.approx(n2) and packed == pytest.approx(padded, rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for key in g1:
        assert torch.allclose(g1[key], g2[key], atol=1e-4, rtol=1e-3), key


@pytest.mark.slow
def test_training_with_packing_follows_the_padded_run(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    """Same seed, same batches: the packed run's loss curve is the padded run's (fp32: summation order aside)."""
    from microtune import pipeline

    curves = []
    for packing in (False, True):
        recipe = make_recipe(tiny_model_dir, train={"packing": packing, "epochs": 2, "bf16": False})
        adapter = pipeline.train(recipe, workspace=tmp_path / f"ws{packing}")
        curves.append([h["loss"] for h in json.loads((adapter / "manifest.json").read_text())["history"]])
    assert len(curves[0]) == len(curves[1]) >= 4
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    assert curves[1][-1] < curves[1][0]


def test_packing_refuses_prompt_learning(tmp_path: Path, make_recipe, tiny_model_dir: Path) -> None:
    from microtune import pipeline
    from microtune.core.errors import RecipeError

    recipe = make_recipe(tiny_model_dir, method={"kind": "prompt_tuning"}, train={"packing": True})
    with pytest.raises(RecipeError, match="train.packing cannot be used with method.kind=prompt_tuning"):
        pipeline.train(recipe, workspace=tmp_path / "ws")
    assert not list((tmp_path / "ws").rglob("adapter.safetensors")) and not list((tmp_path / "ws").rglob("adapter_model.safetensors"))
