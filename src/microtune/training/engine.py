"""The training engine: every fine-tuning method, loss on completion tokens only, safe to interrupt.

    result = train_adapter(recipe, ref, dataset_dir, labels, out_dir, reporter=show, checkpoint_dir=ckpt)

Reads top to bottom: set up (encode the splits, balance the labels, build the model in its process
layout — one process, ddp or fsdp, training/strategy.py —, optimizer, resume from the newest checkpoint;
training/setup.py) → optimizer steps, each followed by logging, validation, checkpoints and early
stopping (training/loop.py) → keep the best weights → save. Speed choices (measured in benchmarks/):
the LM head runs only at positions that carry a label, a prompt prefix shared by the batch is computed
once (training/loss.py), matmuls run under bf16 autocast where the hardware has native bf16 (length
bucketing is an option, off by default). Imbalanced labels are sampled or weighted (``train.balance``).

The engine never prints: it reports ``Event``s with ``stage="train"`` (microtune.core.progress), on rank 0 only:
``start`` (``total`` planned optimizer steps, ``step`` the one it starts from: > 0 on resume), ``progress``
after every optimizer step and ``metrics`` every ``train.log_every`` steps and at the last (both with data
``loss``, ``lr``, ``tokens_per_s``), ``metrics`` after each validation (``valid_loss``), ``done`` at the end
(data: the result's ``final`` figures).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.progress import Reporter, emitter
from microtune.models import BaseModelRef
from microtune.training import distributed as dist
from microtune.training.loop import after_step, finish, step, step_groups
from microtune.training.loss import completion_loss, shared_prefix_len
from microtune.training.setup import DataSource, Resume, build_model, encode_split, resolve_balance, set_up

__all__ = ["build_model", "completion_loss", "encode_split", "resolve_balance", "shared_prefix_len", "train_adapter"]


def train_adapter(recipe: Recipe, ref: BaseModelRef, dataset_dir: Path, labels: list[str], out_dir: Path, *,
                  reporter: Reporter | None = None, checkpoint_dir: Path | None = None, resume: bool = False,
                  run_meta: dict[str, Any] | None = None, extra_train: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fine-tune and save the adapter (or the whole model for ``full``) into ``out_dir``; returns the run's figures.

    ``extra_train`` rows (synthetic ones, picked by the pipeline) are appended to the real train split.
    Checkpoints go to ``checkpoint_dir`` every ``train.save_steps``; ``resume`` continues from the newest,
    ``run_meta`` (the caller's run identifiers) is written into each. Every rank of a torchrun launch calls
    this; only rank 0 reports to ``reporter``.
    """
    emit = emitter(reporter if dist.is_main() else None, "train")
    run = set_up(recipe, ref, DataSource(dataset_dir, labels, extra_train), Resume(checkpoint_dir, resume, run_meta))
    emit("start", step=run.state.step, total=run.plan.steps)
    for group in step_groups(run):
        record = step(run, group)
        if after_step(run, record, emit):
            break
    out = finish(run, out_dir)
    emit("done", step=run.state.step, total=run.plan.steps, **out["final"])
    return out
