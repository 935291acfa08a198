"""The steps of a run: ``step`` (one optimizer step), ``after_step`` (log, validate, checkpoint, stop early), ``finish``.

    for group in step_groups(run):
        record = step(run, group)
        if after_step(run, record, emit):
            break
    result = finish(run, out_dir)

Every rank runs the same code; what differs between one process, ddp and fsdp is the run's strategy
(training/strategy.py). Only rank 0 reports (``emit`` is silent elsewhere) and writes checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.models import loaded_as, param_counts
from microtune.models.hardware import autocast, device, peak_memory_mb
from microtune.training import distributed as dist
from microtune.training.batching import collate, iterate_batches
from microtune.training.checkpoint import load_trainable, save_checkpoint, trainable_state
from microtune.training.cost import cost_report, dense_params
from microtune.training.defaults import uses_checkpointing
from microtune.training.packing import is_packed, pack
from microtune.training.setup import Run
from microtune.training.state import Clock

Emit = Callable[..., None]


def step_groups(run: Run) -> Iterator[list[list[int]]]:
    """The rest of the run's global batches (from ``state.micro`` on), ``train.grad_accum`` per optimizer step
    (fewer in the last step when the run's micro-batches do not divide evenly)."""
    cfg, data = run.cfg, run.data
    lengths = [len(p) + len(c) for p, c, *_ in data.train]
    sample = data.weights if data.balance == "sample" else None
    batches = (idx for _, idx in iterate_batches(lengths, cfg.batch_size, cfg.seed, run.plan.total_micro, run.state.micro,
                                                 sample, run.plan.window))
    while group := list(islice(batches, cfg.grad_accum)):
        yield group


def step(run: Run, group: list[list[int]]) -> dict[str, float]:
    """One optimizer step over the group's micro-batches; returns its record (``loss``, ``lr``, ``tokens_per_s``).

    Gradients are reduced across ranks on the group's last micro-batch only (the others accumulate locally)."""
    import torch

    losses = [_micro_step(run, idx, sync=i == len(group) - 1) for i, idx in enumerate(group)]
    run.scaler.unscale_(run.optimizer)  # the scaler (float16 weights only; else a pass-through): clip the true gradients
    torch.nn.utils.clip_grad_norm_(run.trainable, 1.0)
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer), run.scaler.update()
    if scale is None or run.scaler.get_scale() >= scale:  # a step the scaler skipped (inf/NaN gradients) leaves the lr where it is
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.elapsed = run.clock.seconds()
    return {"loss": sum(losses) / len(losses), "lr": run.scheduler.get_last_lr()[0],
            "tokens_per_s": run.state.tokens / run.state.elapsed}


def _micro_step(run: Run, idx: list[int], sync: bool) -> float:
    """Forward and backward of this rank's share of one global micro-batch; returns the global micro-batch's loss.

    Each rank's loss is scaled by its share of the batch's normaliser (completion tokens, or weight sum), so the
    summed rank gradients are the global batch's mean gradient: N ranks make the update one process makes."""
    mine, idle = _rank_share(idx)
    batch = _on_device(_batch(run, mine))
    with run.strategy.micro_batch(sync):
        with autocast(run.bf16):
            loss, norm = run.strategy.loss(batch)
        norm = 0 if idle else norm
        tokens = 0.0 if idle else float(batch["n_tokens"] if is_packed(batch) else batch["attention_mask"].sum())
        norm_all, tokens_all, loss_all = dist.all_sums([norm, tokens, loss.item() * norm])
        run.scaler.scale(loss * (norm / norm_all) / run.cfg.grad_accum).backward()
    run.state.micro += 1
    run.state.tokens += int(tokens_all)
    return loss_all / norm_all


def _rank_share(idx: list[int]) -> tuple[list[int], bool]:
    """This rank's rows, and whether it has none: a short last batch of an epoch can leave a rank without rows.
    Such a rank runs the batch's first row at weight 0, so every rank makes the same collective calls
    (the loss normaliser sums, FSDP's gathers, DDP's gradient all-reduce) and adds nothing to the update."""
    mine = dist.shard(idx)
    return (mine, False) if mine else (idx[:1], True)


def _batch(run: Run, idx: list[int]) -> dict[str, Any]:
    """Packed rows (``train.packing``) or one right-padded row per example, with loss weights under ``balance: weight``."""
    cfg, data = run.cfg, run.data
    examples = [data.train[j] for j in idx]
    weights = [data.weights[j] for j in idx] if data.balance == "weight" else None
    if cfg.packing:
        share = not uses_checkpointing(run.recipe) and run.strategy.share_prefix
        return pack(examples, data.pad, cfg.max_seq_len, share_prefix=share, weights=weights)
    return collate(examples, data.pad, weights)


def _on_device(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to(device()) for k, v in batch.items()}


def after_step(run: Run, record: dict[str, float], emit: Emit) -> bool:
    """Report the step, keep its record every ``train.log_every`` steps, validate, checkpoint; true to stop early."""
    st, cfg, steps = run.state, run.cfg, run.plan.steps
    last = st.step == steps
    emit("progress", step=st.step, total=steps, **record)
    if st.step % cfg.log_every == 0 or last:
        st.history.append({"step": st.step, **record})
        emit("metrics", step=st.step, total=steps, **record)
    if run.data.valid and (st.step % run.plan.eval_every == 0 or last):
        _validate(run, emit)
    if run.resume.checkpoint_dir and cfg.save_steps and st.step % cfg.save_steps == 0 and not last:
        _checkpoint(run)
    return st.stopped_early


def _validate(run: Run, emit: Emit) -> None:
    """Validation loss; the best weights so far are kept (``train.keep_best``), patience counted (early stopping)."""
    cfg, st = run.cfg, run.state
    loss = _valid_loss(run)
    emit("metrics", step=st.step, total=run.plan.steps, valid_loss=loss)
    if st.observe_valid(loss):
        run.best = trainable_state(run.model) if cfg.keep_best else None
    if cfg.early_stopping_patience and st.since_best >= cfg.early_stopping_patience:
        st.stopped_early = True


def _valid_loss(run: Run) -> float:
    """Token-weighted mean loss over the whole valid split (every rank computes all of it: the same value everywhere)."""
    import torch

    rows, size = run.data.valid, run.cfg.batch_size
    run.model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(run.bf16):
        for start in range(0, len(rows), size):
            loss, n = run.strategy.loss(_on_device(collate(rows[start:start + size], run.data.pad)))
            total, count = total + loss.item() * n, count + n
    run.strategy.release()
    run.model.train()
    return total / max(count, 1)


def _checkpoint(run: Run) -> None:
    """Rank 0 writes; the others wait. The clock restarts after the write, so writing is not training time."""
    if dist.is_main():
        save_checkpoint(run.resume.checkpoint_dir, run.state.to_dict(), run.model, run.optimizer, run.scheduler, run.best, run.scaler)
    dist.barrier()
    run.clock = Clock(run.state.elapsed)


def finish(run: Run, out_dir: Path) -> dict[str, Any]:
    """Keep the best weights, save the adapter (or the whole model for ``full``) and tokenizer; returns ``result``."""
    wall = run.clock.seconds()
    if run.cfg.keep_best and run.best is not None:
        load_trainable(run.model, run.best)
    held = run.strategy.held_mb(run.optimizer)  # before saving: gathering full weights is not what a rank holds
    run.strategy.save(out_dir, trainable_only=not methods.has(run.recipe.method.kind, "full_model"))
    run.tokenizer.save_pretrained(out_dir)
    return result(run, wall, held)


def result(run: Run, wall: float, held: dict[str, float]) -> dict[str, Any]:
    """What the run did: curves, final figures and the cost report (the adapter manifest's training part)."""
    st, kind = run.state, run.recipe.method.kind
    counts = param_counts(run.model)
    final = {"train_loss": st.history[-1]["loss"] if st.history else None, "valid_loss": st.valid[-1]["valid_loss"] if st.valid else None,
             "best_valid_loss": st.best_loss, "steps": st.step, "planned_steps": run.plan.steps,
             "stopped_early": st.stopped_early, "balance": run.data.balance, "resumed": run.resume.resume}
    cost = cost_report(kind, dense_params(run.model), counts["total_params"], counts["trainable_params"], st.tokens, wall, peak_memory_mb())
    layout = {"strategy": run.strategy.name, "ranks": dist.world_size(), "state_mb_per_rank": held}
    return {"method": kind, "history": st.history, "valid_history": st.valid, "final": final,
            "cost": cost | {"device": device(), "bf16": run.bf16, **loaded_as(run.model), "linear_weights_dtype": _linear_dtype(run.model),
                            "distributed": layout}}


def _linear_dtype(model: Any) -> str:
    """The dtype of the frozen linear layers' weights: bf16 where training pre-cast them (``setup.frozen_linears_to_bf16``)."""
    import torch

    found = next((m.weight.dtype for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad), None)
    return str(found).removeprefix("torch.") if found is not None else "none"
