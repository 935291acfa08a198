"""Training across processes (torchrun): gloo on CPU, NCCL on CUDA; the process plumbing of both strategies.

    microtune train RECIPE --nproc 2                                            # ddp (default)
    microtune train RECIPE --nproc 2 --set train.distributed.strategy=fsdp      # sharded (training/fsdp.py)

Every rank takes its share of each global batch (``train.batch_size`` stays the global batch), the
loss is scaled by the rank's share of the batch's completion tokens and gradients are summed across
ranks, so N processes compute the same update as one process with the same global batch. With
``ddp`` every rank holds the whole model and ``sum_gradients`` adds the gradients up; with ``fsdp``
parameters, gradients and optimizer state are sharded and FSDP2 sums the gradients itself
(``microtune.training.fsdp``). Only rank 0 logs, checkpoints and writes artifacts. DeepSpeed is not
wrapped (a recipe asking for it is rejected; `accelerate launch` is the route).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when started by torchrun (no-op for a single process)."""
    import torch
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def shard(batch: list[int]) -> list[int]:
    return batch[rank()::world_size()]


def all_sum(value: float) -> float:
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(params: list[Any]) -> None:
    """Sum gradients across ranks in one flat buffer (adapters are small; full models go bucket by bucket)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for start in range(0, len(grads), 64):
        chunk = grads[start:start + 64]
        flat = torch.cat([g.reshape(-1) for g in chunk])
        dist.all_reduce(flat)
        offset = 0
        for g in chunk:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def held_state_mb(model: Any, optimizer: Any) -> dict[str, float]:
    """MB of parameters and optimizer state this process holds: all of them under ddp, its shards under fsdp."""
    import torch
    from torch.distributed.tensor import DTensor

    def mb(tensors: Any) -> float:
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if torch.is_tensor(t)]
        return round(sum(t.numel() * t.element_size() for t in local) / 2**20, 3)

    return {"params": mb(model.parameters()), "optimizer": mb(v for s in optimizer.state.values() for v in s.values())}


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m microtune.cli <argv>`` under torchrun with ``nproc`` local ranks; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "microtune.cli", *argv]
    return subprocess.run(cmd, check=False).returncode
