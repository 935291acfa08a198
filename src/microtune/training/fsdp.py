"""Sharded training (``train.distributed.strategy: fsdp``) with PyTorch's FSDP2 ``fully_shard``.

    microtune train RECIPE --nproc 2 --set train.distributed.strategy=fsdp

Each decoder layer becomes one FSDP group (its parameters all-gathered just before it runs, its
gradients reduce-scattered right after its backward), then a root group holds the rest (embeddings,
final norm, LM head). The root is the loss as a module (training/root.py), so the fast loss path
(LM head only at completion positions, shared-prefix pass, packing) runs inside FSDP's hooks exactly
as it does unsharded. Each rank's loss is already scaled by its share of the global batch's tokens,
so FSDP is told to sum gradients rather than average them: N ranks make the update one process does.
The final weights are gathered into full tensors on rank 0's CPU, which writes them with the same
``save_pretrained`` call a single process uses (the artifact is the same format).
Imported only when a recipe asks for fsdp (it imports torch at the top).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from microtune.config import FsdpConfig
from microtune.core.errors import RecipeError
from microtune.training import distributed as dist
from microtune.training.root import LossOf, LossRoot


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks, by the class names transformers marks as never to be split across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise RecipeError(f"train.distributed.strategy=fsdp: no decoder layers found in {type(base).__name__} "
                          f"(looked for {sorted(names) or 'the _no_split_modules of the model class'})",
                          hint="use train.distributed.strategy=ddp for this model")
    return layers


def shard(model: Any, cfg: FsdpConfig, loss: LossOf) -> LossRoot:
    """Shard ``model`` in place across the process group; returns the root to train with: ``root(batch) -> (loss, normaliser)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    cuda = torch.cuda.is_available()
    if cfg.cpu_offload and not cuda:
        raise RecipeError("train.distributed.fsdp.cpu_offload needs CUDA devices: on CPU the parameters already live in "
                          "host memory", hint="set train.distributed.fsdp.cpu_offload=false")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.world_size(),))
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, offload_policy=offload)
    root = fully_shard(LossRoot(model, loss), mesh=mesh, offload_policy=offload)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # the loop scales each rank's loss by its token share: gradients must be summed, not averaged;
            # a plain SUM (no PREMUL_SUM, which gloo lacks) with a divide factor of 1
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


def save(root: LossRoot, out_dir: Path, trainable_only: bool) -> None:
    """Gather the full weights (every rank takes part) and let rank 0 write them as a single process would."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = root.model  # (prompt/prefix tuning is rejected with fsdp: PEFT saves it by running the sharded encoder)
    # adapters: only the trainable tensors are gathered (the frozen base is not written); `full`: everything
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if dist.is_main():
        model.save_pretrained(out_dir, state_dict=_retie(model, state))
    dist.barrier()


def _retie(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Gathering copies each name separately, so tied weights (LM head = embeddings) no longer share a tensor;
    sharing it again lets ``save_pretrained`` drop the tied copy as it does for an unsharded model."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]
    return state
