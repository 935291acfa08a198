"""The process layout of a run: one process (``none``), ``ddp`` or ``fsdp`` — one small class each, one interface.

    strategy = pick(recipe.train)            # before the model is built: fsdp places the model's shards itself
    strategy.wrap(model, recipe.train)
    with strategy.micro_batch(sync=last):    # ddp: gradients are all-reduced only on a step's last micro-batch
        loss, norm = strategy.loss(batch)
        loss.backward()

What differs between layouts lives here; the loop (training/loop.py) is the same for all three. Common to all:
every rank computes the loss of its share of the global batch, scaled by its share of the batch's completion
tokens, and the ranks' gradients are *summed* (not averaged), so N processes make the update one process makes
with the same global batch. Gradient reduction happens inside backward (DDP's bucket hooks overlap the
all-reduce with the rest of the backward; FSDP reduce-scatters layer by layer), so no step of the loop waits
for a separate reduction pass.
"""
from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from microtune.training import distributed as dist
from microtune.training.loss import completion_loss

log = logging.getLogger(__name__)


class Single:
    """One process: the model as it is, nothing to reduce."""

    name = "none"
    places_model = False  # whether wrap() moves the model to the device itself (the builder then leaves it where it loads)
    share_prefix = True  # whether packing may cut the prompt prefix a rank's rows share (see Fsdp)

    def wrap(self, model: Any, cfg: Any) -> None:
        self.model = model

    def loss(self, batch: dict[str, Any]) -> tuple[Any, float]:
        """``(loss, normaliser)`` of this rank's rows, through whatever wrapper the layout needs."""
        return completion_loss(self.model, batch)

    def micro_batch(self, sync: bool) -> AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward; ``sync`` is false on the micro-batches a step accumulates before its last."""
        return contextlib.nullcontext()

    def save(self, out_dir: Path, trainable_only: bool) -> None:
        self.model.save_pretrained(out_dir)

    def held_mb(self, optimizer: Any) -> dict[str, float]:
        """MB of parameters and optimizer state this rank holds (the cost report's ``state_mb_per_rank``)."""
        return dist.held_state_mb(self.model, optimizer)

    def release(self) -> None:
        """Free what forwards without backward (validation) left gathered."""


class Ddp(Single):
    """Every rank holds the whole model; ``torch.nn.parallel.DistributedDataParallel`` sums the gradients.

    DDP's hooks fire only when the forward goes through the module it wraps, so it wraps the loss
    (``LossRoot``) rather than the model. Every trainable parameter takes part in every loss, so
    ``find_unused_parameters`` stays off (no graph search per step). DDP averages by default; a comm hook sums
    instead, because each rank's loss already carries its share of the global batch. Buffers (rotary tables)
    are constants: no per-forward broadcast.
    """

    name = "ddp"

    def wrap(self, model: Any, cfg: Any) -> None:
        import inspect

        import torch
        from torch.nn.parallel import DistributedDataParallel

        from microtune.training.root import LossRoot

        self.model = model
        ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.12 renamed it
        constant_buffers = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        self.root = DistributedDataParallel(LossRoot(model, completion_loss), device_ids=ids, **constant_buffers)
        self.root.register_comm_hook(None, _sum_hook)

    def loss(self, batch: dict[str, Any]) -> tuple[Any, float]:
        return self.root(batch)

    def micro_batch(self, sync: bool) -> AbstractContextManager[Any]:
        return contextlib.nullcontext() if sync else self.root.no_sync()


class Fsdp(Single):
    """Parameters, gradients and optimizer state sharded across ranks with FSDP2 (training/fsdp.py)."""

    name = "fsdp"
    places_model = True
    # no shared-prefix pass: ranks must call every FSDP layer equally often (each call is a collective),
    # and whether a rank's rows share a prefix differs from rank to rank
    share_prefix = False

    def wrap(self, model: Any, cfg: Any) -> None:
        from microtune.training import fsdp

        self.model = model
        self.root = fsdp.shard(model, cfg.distributed.fsdp, lambda m, batch: completion_loss(m, batch, share_prefix=False))

    def loss(self, batch: dict[str, Any]) -> tuple[Any, float]:
        return self.root(batch)

    def save(self, out_dir: Path, trainable_only: bool) -> None:
        from microtune.training import fsdp

        fsdp.save(self.root, out_dir, trainable_only=trainable_only)

    def release(self) -> None:
        self.root.release()


def pick(cfg: Any) -> Single:
    """The layout for ``train`` settings and the processes torchrun started (``WORLD_SIZE``)."""
    if dist.world_size() == 1:
        if cfg.distributed.strategy == "fsdp":
            log.warning("train.distributed.strategy=fsdp with one process: nothing to shard across, training unsharded "
                        "(run `microtune train RECIPE --nproc N` with N >= 2 to shard)")
        return Single()
    return Fsdp() if cfg.distributed.strategy == "fsdp" else Ddp()


def _sum_hook(state, bucket):  # no annotations: DDP rejects a hook annotated with other than its own types
    """DDP comm hook: all-reduce a gradient bucket as a plain sum (DDP's default divides by the world size)."""
    import torch.distributed as tdist

    return tdist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])
