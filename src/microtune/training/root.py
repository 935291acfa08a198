"""The loss as a module: the root that DDP's and FSDP's hooks attach to.

DDP reduces gradients and FSDP gathers parameters through hooks that run only when the forward goes through
the module they wrap. microtune's loss does not call ``model(...)`` (it runs the decoder itself, shares the
prompt prefix and applies the LM head at completion positions only, training/loss.py), so both wrap this
module, whose forward is that loss. Imported only by the multi-process strategies (it imports torch).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

LossOf = Callable[[Any, dict[str, Any]], tuple[Any, float]]


class LossRoot(torch.nn.Module):
    """``root(batch) -> (loss, normaliser)``: ``loss(model, batch)`` with ``model`` registered as a submodule."""

    def __init__(self, model: Any, loss: LossOf):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: dict[str, Any]) -> tuple[Any, float]:
        return self.loss(self.model, batch)

    def release(self) -> None:
        """Free gathered parameters after a forward without backward (validation): nothing reshards them then, so
        under FSDP the root group (and, without reshard_after_forward, every layer) would stay whole until the next
        step. A no-op for an unsharded module."""
        for module in self.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
