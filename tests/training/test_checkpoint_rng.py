"""Checkpoint RNG state across machines: CPU generators always, every GPU's generator where CUDA is, each side tolerated
without the other (a warning says what differs); an enabled loss scaler (float16 weights) resumes at its scale."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from microtune.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _parts():
    import torch
    from transformers import get_linear_schedule_with_warmup

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, get_linear_schedule_with_warmup(optimizer, 0, 10)


def _draws() -> tuple:
    import numpy as np
    import torch

    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def _save(folder: Path, scaler=None) -> Path:
    model, optimizer, scheduler = _parts()
    return save_checkpoint(folder, {"step": 1}, model, optimizer, scheduler, None, scaler)


def test_cpu_checkpoint_restores_every_cpu_generator(tmp_path: Path) -> None:
    import torch

    path = _save(tmp_path)
    expected = _draws()
    saved = torch.load(path / "training_state.pt", weights_only=True)["rng"]
    assert set(saved) == ({"torch", "python", "numpy", "cuda"} if torch.cuda.is_available() else {"torch", "python", "numpy"})
    _draws()  # move every generator on
    load_checkpoint(path, *_parts())
    assert _draws() == expected


def test_checkpoint_with_gpu_state_is_accepted_on_a_cpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written on a GPU machine (with `cuda` RNG states) resumes on a CPU: CPU generators restored, a warning."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU side of the move")
    path = _save(tmp_path)
    expected = _draws()
    state = torch.load(path / "training_state.pt", weights_only=True)
    state["rng"]["cuda"] = [torch.get_rng_state(), torch.get_rng_state()]  # two GPUs' generator states (ByteTensors, as CUDA's)
    torch.save(state, path / "training_state.pt")
    _draws()
    with caplog.at_level(logging.WARNING, logger="microtune.training.checkpoint"):
        load_checkpoint(latest_checkpoint(tmp_path), *_parts())
    assert _draws() == expected
    assert "RNG state of 2 GPU(s) and this machine has none" in caplog.text


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_gpu_generators_round_trip(tmp_path: Path) -> None:
    import torch

    path = _save(tmp_path)
    expected = torch.rand(3, device="cuda").tolist()
    torch.rand(5, device="cuda")
    load_checkpoint(path, *_parts())
    assert torch.rand(3, device="cuda").tolist() == expected


def test_loss_scaler_resumes_at_its_scale(tmp_path: Path) -> None:
    """float16 weights train with an enabled GradScaler; its calibrated scale is part of the checkpoint."""
    import torch

    path = _save(tmp_path, torch.amp.GradScaler("cpu", init_scale=1024.0))
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0)
    load_checkpoint(path, *_parts(), fresh)
    assert fresh.get_scale() == 1024.0
    assert "scaler" not in torch.load(_save(tmp_path / "plain", torch.amp.GradScaler("cpu", enabled=False)) / "training_state.pt",
                                      weights_only=True)
