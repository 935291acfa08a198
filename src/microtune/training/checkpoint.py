"""Resumable checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

RNG state is Python's, NumPy's, torch's CPU generator and, on a CUDA machine, every GPU's generator
(``torch.cuda.get_rng_state_all``: dropout on the GPU draws from those). A checkpoint moves between
machines: one written on a CPU resumes on a GPU (the GPU generators stay as seeded, with a warning) and
one written on a GPU resumes on a CPU (its GPU states are not needed there; a warning says so).
Only rank 0 writes checkpoints, so under ``--nproc N`` every rank resumes with rank 0's generator
states (as for the CPU generators): the draws after a resume are reproducible, not those of the other
ranks' uninterrupted run.

A checkpoint is ``<run checkpoints>/step-<N>/`` written atomically (temp folder, then rename), so a
``kill -9`` at any moment leaves the previous checkpoint intact. Weights are safetensors; the
optimizer and scheduler state go through ``torch.save`` and are read back with
``weights_only=True`` (tensors and plain values only, no pickled code).
"""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

from microtune.core.atomic import atomic_dir, read_json, write_json
from microtune.core.crashpoints import reach

log = logging.getLogger(__name__)
KEEP = 2  # older checkpoints are removed once a newer one is complete


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one ByteTensor per visible GPU
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    _set_cuda_rng(state.get("cuda"))


def _set_cuda_rng(saved: list[Any] | None) -> None:
    """Restore the GPUs' generators where the checkpoint has them and this machine has GPUs; otherwise say what differs.
    A different GPU count restores the GPUs both have (a rank only draws from its own device)."""
    import torch

    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved is None:
        if here:
            log.warning("the checkpoint was written without CUDA RNG state (on a CPU machine); the GPU generators keep "
                        "their seeded state, so GPU dropout draws differ from an uninterrupted run")
        return
    if not here:
        log.warning("the checkpoint holds the RNG state of %d GPU(s) and this machine has none: resuming on the CPU, "
                    "whose generator is restored", len(saved))
        return
    if len(saved) != here:
        log.warning("the checkpoint holds the RNG state of %d GPU(s), this machine has %d: restoring the first %d",
                    len(saved), here, min(len(saved), here))
    for index, rng in enumerate(saved[:here]):
        torch.cuda.set_rng_state(rng, device=index)


def save_checkpoint(folder: Path, state: dict[str, Any], model: Any, optimizer: Any, scheduler: Any,
                    best: dict[str, Any] | None, scaler: Any = None) -> Path:
    """Write ``step-<state["step"]>/``; ``state`` is the run's ``TrainState.to_dict()`` (state.json, read back by resume).
    An enabled loss scaler (float16 weights) is saved too, so a resumed run keeps its calibrated scale."""
    import torch
    from safetensors.torch import save_file

    dest = folder / f"step-{state['step']:08d}"
    with atomic_dir(dest) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        if best is not None:
            save_file(best, tmp / "best.safetensors")
        training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
        if scaler is not None and scaler.is_enabled():
            training["scaler"] = scaler.state_dict()
        torch.save(training, tmp / "training_state.pt")
        write_json(tmp / "state.json", state)
    reach("train.after_checkpoint")
    for old in sorted(folder.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any,
                    scaler: Any = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights, optimizer, scheduler, RNG (and the loss scaler when both sides have one); returns
    ``(state, best_weights_or_None)``, state as saved."""
    import torch
    from safetensors.torch import load_file

    load_trainable(model, load_file(path / "trainable.safetensors"))
    state = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    best = load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
    return read_json(path / "state.json"), best
