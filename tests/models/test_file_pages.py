"""Weights mapped from a checkpoint file that training has replaced by copies do not stay resident beside the copies
(``models.hardware.drop_file_pages``): which pages a process holds is read from /proc/self/pagemap, page by page."""
from __future__ import annotations

import mmap
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is read from Linux's /proc")


def _present(tensor_or_range: Any) -> float:
    """The share of the whole pages inside a tensor's bytes that this process holds in memory."""
    start, nbytes = (tensor_or_range.data_ptr(), tensor_or_range.numel() * tensor_or_range.element_size()) \
        if hasattr(tensor_or_range, "data_ptr") else tensor_or_range
    page = mmap.PAGESIZE
    first, last = -(-start // page), (start + nbytes) // page
    assert last > first, "the tensor spans no whole page"
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first}Q", pagemap.read((last - first) * 8))
    return sum(entry >> 63 for entry in entries) / len(entries)  # bit 63: the page is present


def _file_mapped(tensor: Any) -> bool:
    ptr = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return len(fields) >= 6 and fields[5].startswith("/")
    return False


def test_only_the_given_tensors_file_pages_are_dropped_and_their_values_stay(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import safe_open, save_file

    from microtune.models.hardware import drop_file_pages

    save_file({"a": torch.randn(256, 1024).to(torch.bfloat16), "b": torch.randn(256, 1024).to(torch.bfloat16)},
              tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:
        a, b = handle.get_tensor("a"), handle.get_tensor("b")
    assert _file_mapped(a) and _file_mapped(b)
    total = float(a.float().sum() + b.float().sum())  # touches every page of both
    assert _present(a) == 1.0 and _present(b) == 1.0
    assert drop_file_pages([a]) > 0
    assert _present(a) == 0.0 and _present(b) == 1.0
    assert float(a.float().sum() + b.float().sum()) == total  # a page dropped is read again from the file
    anon = torch.randn(512, 1024)
    kept = anon.clone()
    assert drop_file_pages([anon]) == 0 and torch.equal(anon, kept)  # process memory is never advised


def test_fusing_a_bf16_checkpoint_drops_the_originals_pages(make_recipe, tokenizer: Any, tmp_path: Path) -> None:
    """A bf16 checkpoint loads as stored (its linear weights are views of the file's map); fusing q/k/v and gate/up copies
    them into one tensor per group, and the originals' pages are no longer held (1.9 GiB at the 1.7B shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from microtune.config import load_recipe
    from microtune.models import resolve_base
    from microtune.training.fuse import fuse_siblings
    from microtune.training.setup import build_model, precast

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "bf16-llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = load_recipe(make_recipe(folder, method={"kind": "lora", "r": 4}, train={"bf16": True}))
    model = build_model(recipe, resolve_base(recipe.model), autocast=True)
    precast(recipe, model)
    layer = model.get_base_model().model.layers[0]
    siblings = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj]
    originals = [m.base_layer.weight for m in siblings]
    assert all(_file_mapped(w) for w in originals)  # loaded as stored: else there is nothing to drop
    spans = [(w.data_ptr(), w.numel() * w.element_size()) for w in originals]
    want = [w.float().sum() for w in originals]
    del originals
    assert fuse_siblings(model) == 4
    assert all(_present(span) == 0.0 for span in spans)
    assert [m.base_layer.weight.float().sum() for m in siblings] == want and not _file_mapped(siblings[0].base_layer.weight)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.tensor([[1, 5, 9, 14]]))
    assert _present(layer.self_attn.o_proj.base_layer.weight) == 1.0  # a weight still read from the map stays mapped
