"""Sibling LoRA layers fused for training: one matmul where PEFT makes several on the same input.

A decoder layer feeds one tensor to q, k and v, and another to gate and up. PEFT's LoRA runs each as its own base
matmul plus two small LoRA matmuls (A, then B), so a Llama layer makes 21 matmuls forward where 12 do the same work:
the group's base weights side by side (one matmul), its LoRA A matrices stacked (one matmul), its B matrices on a
block diagonal (one matmul), the output split back into the siblings' shares. On a CPU each small matmul has a fixed
cost well above its arithmetic (benchmarks/train_speed.py; BENCHMARKS.md, training levers), and autocast casts the
shared input once per group instead of once per layer.

Nothing about the adapter changes: the LoRA parameters stay PEFT's own (saved, checkpointed and reduced as before),
the frozen base weights become views of the group's weight (no extra memory: where the originals were views of the
checkpoint file's memory map, their pages are dropped, ``models.hardware.drop_file_pages``), and loss and gradients are those of
PEFT's path (tests/training/test_fuse.py). The first sibling called computes the group's outputs and keeps the others'
for their calls on the same tensor; a sibling called on any other input, with adapters disabled or merged, or with
another adapter active, runs PEFT's own forward. Applied by the engine to plain LoRA (no dropout on the LoRA input:
PEFT draws one mask per layer) on frozen linear layers held in one dtype; ``train.fuse_siblings: false`` turns it off.
"""
from __future__ import annotations

from typing import Any

from microtune.models.hardware import drop_file_pages

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read the same input tensor


class _Group:
    def __init__(self, members: list[Any], adapter: str) -> None:
        import torch

        self.members, self.adapter = members, adapter
        bases = [m.base_layer for m in members]
        self.sizes = [b.out_features for b in bases]
        self.weight = torch.cat([b.weight.detach() for b in bases])  # the members' weights become views of this one
        drop_file_pages([b.weight for b in bases])  # originals mapped from the checkpoint file: their pages are not held twice
        start = 0
        for base, size in zip(bases, self.sizes):
            base.weight = torch.nn.Parameter(self.weight[start:start + size], requires_grad=False)
            start += size
        self.bias = torch.cat([b.bias.detach() for b in bases]) if bases[0].bias is not None else None
        self.x: Any = None
        self.pending: dict[int, Any] = {}

    def usable(self, module: Any) -> bool:
        return (not module.disable_adapters and not module.merged and list(module.active_adapters) == [self.adapter])

    def compute(self, x: Any) -> list[Any]:
        import torch
        import torch.nn.functional as F

        a = torch.cat([m.lora_A[self.adapter].weight for m in self.members])
        b = torch.block_diag(*[m.lora_B[self.adapter].weight * m.scaling[self.adapter] for m in self.members])
        base = F.linear(x, self.weight, self.bias)
        # as PEFT does: the LoRA path in the adapter's dtype (fp32 beside bf16/fp16 weights without autocast), the sum
        # in the base output's dtype
        lora = F.linear(F.linear(x.to(a.dtype), a), b)
        return list((base + lora).to(base.dtype).split(self.sizes, dim=-1))

    def forward(self, index: int, module: Any, original: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not self.usable(module):
            return original(x, *args, **kwargs)
        if self.x is x and index in self.pending:
            out = self.pending.pop(index)
            if not self.pending:
                self.x = None
            return out
        outs = self.compute(x)
        self.x, self.pending = x, {j: o for j, o in enumerate(outs) if j != index}
        return outs[index]


def fusable(module: Any) -> bool:
    """A PEFT LoRA ``Linear`` on a plain frozen ``nn.Linear``, one adapter, no dropout, no DoRA or other variant."""
    import torch
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or type(module.base_layer) is not torch.nn.Linear or module.base_layer.weight.requires_grad:
        return False
    adapters = list(module.lora_A.keys())
    return (len(adapters) == 1 and not module.lora_variant and not module.merged
            and isinstance(module.lora_dropout[adapters[0]], torch.nn.Identity))


def fuse_siblings(model: Any) -> int:
    """Fuse every group of ``GROUPS`` whose members are all ``fusable`` with one adapter, one dtype and one input width;
    returns how many groups."""
    from functools import partial

    fused = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(m is not None and fusable(m) for m in members):
                continue
            adapters = {a for m in members for a in m.lora_A}
            bases = [m.base_layer for m in members]
            if (len(adapters) != 1 or len({b.in_features for b in bases}) != 1 or len({b.weight.dtype for b in bases}) != 1
                    or len({b.bias is None for b in bases}) != 1):
                continue
            group = _Group(members, adapters.pop())
            for index, member in enumerate(members):
                member.forward = partial(group.forward, index, member, member.forward)
            fused += 1
    return fused
