"""Training across processes (torchrun): gloo on CPU, NCCL on CUDA; the process plumbing the strategies share.

    microtune train RECIPE --nproc 2                                            # ddp (default)
    microtune train RECIPE --nproc 2 --set train.distributed.strategy=fsdp      # sharded (training/fsdp.py)

Every rank takes its share of each global batch (``train.batch_size`` stays the global batch), the
loss is scaled by the rank's share of the batch's completion tokens and gradients are summed across
ranks, so N processes compute the same update as one process with the same global batch. With
``ddp`` every rank holds the whole model and torch's DistributedDataParallel sums the gradients
during backward; with ``fsdp`` parameters, gradients and optimizer state are sharded and FSDP2 sums
them (training/strategy.py holds both layouts). Only rank 0 reports, checkpoints and writes
artifacts. DeepSpeed is not wrapped (a recipe asking for it is rejected; `accelerate launch` is the route).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from microtune.core.errors import InputError


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
        if not torch.cuda.is_available():
            dist.init_process_group("gloo")
            return
        # one GPU per rank: the local rank's device becomes the current one before any model, tensor or collective exists,
        # so device() ("cuda"), model.to(device()), DDP's device_ids, the 4-bit loader's placement and FSDP's mesh all
        # mean this rank's GPU; device_id binds the NCCL communicator to it (no barrier on a guessed device)
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if local.index >= torch.cuda.device_count():
            raise InputError(f"--nproc: process {local.index} has no GPU of its own (this machine has {torch.cuda.device_count()})",
                             hint=f"run one process per GPU: --nproc {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)


def shard(batch: list[int]) -> list[int]:
    return batch[rank()::world_size()]


def all_sums(values: list[float]) -> list[float]:
    """Each value summed over the ranks, in one collective (float64; on the device NCCL needs, the CPU for gloo)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return list(values)
    where = torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(t)
    return t.tolist()


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
