"""The training engine: every fine-tuning method, loss on completion tokens only, safe to interrupt.

    result = train_adapter(recipe, ref, dataset_dir, labels, out_dir, checkpoint_dir=ckpt, resume=False)

Reads top to bottom: encode the splits → build the model (4-bit base for qlora; sharded with FSDP2 under
``train.distributed.strategy: fsdp``, see training/fsdp.py) → optimizer →
(resume from the newest checkpoint) → steps with validation, early stopping, checkpoints → keep the
best weights → save. Speed choices (measured in benchmarks/): the LM head runs only at positions
that carry a label, a prompt prefix shared by the batch is computed once, matmuls run under bf16
autocast where the hardware has native bf16 (length bucketing is an option, off by default).
Imbalanced labels are sampled or weighted (``train.balance``).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import Recipe
from microtune.core.errors import RecipeError
from microtune.data import imbalance, read_split
from microtune.models import (
    BaseModelRef,
    MethodContext,
    apply_method,
    load_model,
    load_tokenizer,
    param_counts,
    quantization_config,
)
from microtune.models.compat import cache_kwarg, cache_of
from microtune.models.hardware import autocast, device, peak_memory_mb, seed_everything, use_bf16
from microtune.tasks import get_task
from microtune.tasks.render import Renderer
from microtune.training import distributed as dist
from microtune.training.batching import batches_per_epoch, collate, iterate_batches, label_weights
from microtune.training.checkpoint import latest_checkpoint, load_checkpoint, load_trainable, save_checkpoint, trainable_state
from microtune.training.cost import cost_report, dense_params
from microtune.training.packing import is_packed, pack, packed_hidden_states

LogFn = Callable[[int, dict[str, float]], None]
log = logging.getLogger(__name__)
BUCKET_WINDOW = 50  # batches per length-sorting window when train.length_bucketing is on


def _fast_path(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return not getattr(config, "is_prompt_learning", False)


def shared_prefix_len(batch: dict[str, Any]) -> int:
    """Tokens every row of the batch starts with, stopping before the first completion token of any row."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0).long().cumprod(dim=0)
    first_label = int((labels != -100).long().argmax(dim=1).min())
    return max(0, min(int(same.sum()), first_label - 1))


def _hidden_states(base: Any, batch: dict[str, Any], prefix: int) -> Any:
    """Decoder hidden states; a prefix shared by all rows (system prompt, template) is computed once.

    The prefix runs as one row, its KV cache is repeated for the batch and the rows continue from it.
    Gradients flow through the repeated cache into the single prefix pass, so loss and gradients equal
    those of the full batch (tested), at the cost of the prefix once instead of once per row.
    """
    import torch

    decoder = base.get_decoder()
    if prefix < 2 or getattr(decoder, "gradient_checkpointing", False):
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    ids, rows = batch["input_ids"], batch["input_ids"].shape[0]
    head = decoder(input_ids=ids[:1, :prefix], use_cache=True)
    cache = cache_of(head)
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(prefix, ids.shape[1], device=ids.device).expand(rows, -1)
    tail = decoder(input_ids=ids[:, prefix:], attention_mask=batch["attention_mask"], position_ids=positions,
                   use_cache=True, **{cache_kwarg(decoder): cache})
    return torch.cat([head.last_hidden_state.expand(rows, -1, -1), tail.last_hidden_state], dim=1)


def completion_loss(model: Any, batch: dict[str, Any], share_prefix: bool = True) -> tuple[Any, float]:
    """Cross-entropy over completion tokens (weighted per example when the batch has ``weights``) and its
    normaliser (the token count, or the weight sum), which data-parallel ranks use to combine losses.

    On the fast path the LM head sees only completion positions and a prompt prefix shared by the
    batch is computed once; prompt-learning methods need PEFT's own forward (it prepends virtual
    tokens), so their logits are taken from the full output.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    keep = targets != -100
    if is_packed(batch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = packed_hidden_states(base.get_decoder(), batch)
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    elif _fast_path(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = _hidden_states(base, batch, shared_prefix_len(batch) if share_prefix else 0)
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        width = batch["input_ids"].shape[1]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -width:][:, :-1][keep]
    ce = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    if "weights" in batch:
        w = batch["weights"][:, None].expand_as(targets)[keep]
    elif "token_weights" in batch:
        w = batch["token_weights"][:, 1:][keep]
    else:
        return ce.mean(), int(keep.sum())
    return (ce * w).sum() / w.sum(), float(w.sum())


def encode_split(rows: list[dict[str, Any]], task: Any, renderer: Renderer, max_len: int) -> list[tuple[list[int], list[int]]]:
    return [renderer.encode(task.messages(r), task.target(r), max_len) for r in rows]


def resolve_balance(setting: str, labels: list[str | None]) -> str:
    """``auto`` → ``sample`` when the majority label would dominate (the same rule as `check`'s warning).

    Tasks without labels (extract, generate) have nothing to balance: ``auto`` is ``none`` and an explicit
    ``sample``/``weight`` is an error rather than a silently ignored option."""
    if any(label is None for label in labels):
        if setting in ("sample", "weight"):
            raise RecipeError(f"train.balance={setting} needs labels; this task type has none",
                              hint="set train.balance=auto (or none) for extract and generate recipes")
        return "none"
    if setting != "auto":
        return setting
    return "sample" if imbalance(labels) else "none"


def build_model(recipe: Recipe, ref: BaseModelRef) -> Any:
    quant = quantization_config(recipe.method)
    model = load_model(ref, recipe.model.trust_remote_code, quant)
    model.config.use_cache = False
    if quant is None and not _shards(recipe.train):  # FSDP moves each layer's shard to the device as it shards it
        model = model.to(device())
    model = apply_method(model, recipe.method, MethodContext(recipe.train.seed, recipe.task.instruction, ref.path))
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


class _Reporter:
    """A rich progress bar on a terminal, a line every ~10 % otherwise, or nothing."""

    def __init__(self, mode: str | None, total: int, start: int):
        self.mode, self.total, self.bar, self.every = mode, total, None, max(1, total // 10)
        if mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("training", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tps:.0f} tok/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_adapter(recipe: Recipe, ref: BaseModelRef, dataset_dir: Path, labels: list[str], out_dir: Path,
                  on_log: LogFn | None = None, progress: str | None = "bar", checkpoint_dir: Path | None = None,
                  resume: bool = False, run_meta: dict[str, Any] | None = None,
                  extra_train: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fine-tune and save the adapter (or the whole model for ``full``) into ``out_dir``.

    ``extra_train`` rows (synthetic ones, picked by the pipeline) are appended to the real train split.
    """
    import torch

    cfg = recipe.train
    dist.init()
    if cfg.batch_size < dist.world_size():
        raise RecipeError(f"train.batch_size {cfg.batch_size} is smaller than the {dist.world_size()} processes",
                          hint="the batch is split across processes: use a batch_size of at least --nproc")
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(ref)
    renderer, task = Renderer(tokenizer), get_task(recipe.task, labels)
    train_rows = read_split(dataset_dir, "train") + list(extra_train or [])
    train_set = encode_split(train_rows, task, renderer, cfg.max_seq_len)
    valid_set = encode_split(read_split(dataset_dir, "valid"), task, renderer, cfg.max_seq_len)
    balance = resolve_balance(cfg.balance, [r.get("label") for r in train_rows])
    weights = label_weights([r["label"] for r in train_rows], cfg.balance_power) if balance != "none" else None
    model = build_model(recipe, ref)
    loss_fn, sharded = _loss_fn(model, cfg)
    bf16 = use_bf16(cfg.bf16)
    lengths = [len(p) + len(c) for p, c in train_set]
    window = BUCKET_WINDOW if cfg.length_bucketing else 1
    per_epoch = batches_per_epoch(len(lengths), cfg.batch_size, window)
    total_micro = cfg.max_steps * cfg.grad_accum if cfg.max_steps else max(1, round(per_epoch * cfg.epochs))
    steps = math.ceil(total_micro / cfg.grad_accum)
    eval_every = cfg.eval_steps or max(1, round(per_epoch / cfg.grad_accum))
    optimizer, scheduler = _optimizer(model, cfg, steps)
    st: dict[str, Any] = {"step": 0, "micro": 0, "tokens": 0, "elapsed": 0.0, "history": [], "valid": [],
                          "best_loss": None, "since_best": 0, "stopped_early": False, **(run_meta or {})}
    best = None
    if resume and checkpoint_dir and (ckpt := latest_checkpoint(checkpoint_dir)):
        meta, best = load_checkpoint(ckpt, model, optimizer, scheduler)
        st.update(meta)
    pad, accum, n_acc, start = tokenizer.pad_token_id, [0.0, 0], 0, time.perf_counter()
    report = _Reporter(progress if dist.is_main() else None, steps, st["step"])
    on_log = on_log if dist.is_main() else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        for _epoch, idx in iterate_batches(lengths, cfg.batch_size, cfg.seed, total_micro, st["micro"],
                                           weights if balance == "sample" else None, window):
            idx, idle = _rank_share(idx)  # this rank's share of the global batch (all of it for one process)
            batch = _batch([train_set[j] for j in idx], pad, [weights[j] for j in idx] if balance == "weight" else None, cfg, sharded)
            batch = {k: v.to(device()) for k, v in batch.items()}
            with autocast(bf16):
                loss, norm = loss_fn(batch)
            norm = 0 if idle else norm
            norm_all = dist.all_sum(norm)  # scale so summed rank gradients = the global batch's mean gradient
            (loss * (norm / norm_all) / cfg.grad_accum).backward()
            st["micro"] += 1
            st["tokens"] += int(dist.all_sum(0.0 if idle else float(batch["n_tokens"] if is_packed(batch) else batch["attention_mask"].sum())))
            accum, n_acc = [accum[0] + dist.all_sum(loss.item() * norm) / norm_all, accum[1] + 1], n_acc + 1
            if n_acc < cfg.grad_accum and st["micro"] != total_micro:
                continue
            if not sharded:  # FSDP reduce-scatters the gradients itself, layer by layer, during backward
                dist.sum_gradients(trainable)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            st["step"] += 1
            elapsed = st["elapsed"] + time.perf_counter() - start
            record = {"loss": accum[0] / accum[1], "lr": scheduler.get_last_lr()[0], "tokens_per_s": st["tokens"] / elapsed}
            accum, n_acc = [0.0, 0], 0
            report.update(st["step"], record["loss"], record["tokens_per_s"])
            if st["step"] % cfg.log_every == 0 or st["step"] == steps:
                st["history"].append({"step": st["step"], **record})
                if on_log:
                    on_log(st["step"], record)
            if valid_set and (st["step"] % eval_every == 0 or st["step"] == steps):
                best = _validate(model, loss_fn, valid_set, cfg, pad, bf16, st, best, on_log)
                if cfg.early_stopping_patience and st["since_best"] >= cfg.early_stopping_patience:
                    st["stopped_early"] = True
            if checkpoint_dir and cfg.save_steps and (st["step"] % cfg.save_steps == 0) and st["step"] < steps:
                st["elapsed"] = elapsed
                if dist.is_main():
                    save_checkpoint(checkpoint_dir, st["step"], model, optimizer, scheduler, _meta(st), best)
                dist.barrier()
                start, st["elapsed"] = time.perf_counter(), elapsed
            if st["stopped_early"]:
                break
    finally:
        report.close()
    wall = st["elapsed"] + time.perf_counter() - start
    if cfg.keep_best and best is not None:
        load_trainable(model, best)
    held = dist.held_state_mb(model, optimizer)  # before saving: gathering full weights is not what a rank holds
    _save(model, loss_fn, out_dir, sharded, recipe.method.kind)
    tokenizer.save_pretrained(out_dir)
    counts = param_counts(model)
    final_valid = st["valid"][-1]["valid_loss"] if st["valid"] else None
    return {
        "method": recipe.method.kind,
        "history": st["history"],
        "valid_history": st["valid"],
        "final": {"train_loss": st["history"][-1]["loss"] if st["history"] else None, "valid_loss": final_valid,
                  "best_valid_loss": st["best_loss"], "steps": st["step"], "planned_steps": steps,
                  "stopped_early": st["stopped_early"], "balance": balance, "resumed": resume},
        "cost": cost_report(recipe.method.kind, dense_params(model), counts["total_params"], counts["trainable_params"],
                            st["tokens"], wall, peak_memory_mb()) | {"device": device(), "bf16": bf16, "distributed": {
                                "strategy": "fsdp" if sharded else "ddp" if dist.world_size() > 1 else "none",
                                "ranks": dist.world_size(), "state_mb_per_rank": held}},
    }


def _batch(examples: list[tuple[list[int], list[int]]], pad: int, weights: list[float] | None, cfg: Any,
           sharded: bool = False) -> dict[str, Any]:
    """Packed rows (``train.packing``) or one right-padded row per example."""
    if cfg.packing:
        share = not cfg.gradient_checkpointing and not sharded  # FSDP: one decoder call per step on every rank
        return pack(examples, pad, cfg.max_seq_len, share_prefix=share, weights=weights)
    return collate(examples, pad, weights)


def _rank_share(idx: list[int]) -> tuple[list[int], bool]:
    """This rank's rows, and whether it has none: a short last batch of an epoch can leave a rank without rows.
    Such a rank runs the batch's first row at weight 0, so every rank makes the same collective calls
    (the loss normaliser sums, FSDP's gathers, the gradient sums) and adds nothing to the update."""
    mine = dist.shard(idx)
    return (mine, False) if mine else (idx[:1], True)


def _shards(cfg: Any) -> bool:
    return cfg.distributed.strategy == "fsdp" and dist.world_size() > 1


def _loss_fn(model: Any, cfg: Any) -> tuple[Callable[[dict[str, Any]], tuple[Any, float]], bool]:
    """``batch -> (loss, normaliser)``, and whether the model was sharded (FSDP) to get it."""
    if _shards(cfg):
        from microtune.training import fsdp

        # no shared-prefix pass: ranks must call every FSDP layer equally often (each call is a collective),
        # and whether a rank's rows share a prefix differs from rank to rank
        return fsdp.shard(model, cfg.distributed.fsdp, lambda m, batch: completion_loss(m, batch, share_prefix=False)), True
    if cfg.distributed.strategy == "fsdp":
        log.warning("train.distributed.strategy=fsdp with one process: nothing to shard across, training unsharded "
                    "(run `microtune train RECIPE --nproc N` with N >= 2 to shard)")
    return (lambda batch: completion_loss(model, batch)), False


def _save(model: Any, loss_fn: Any, out_dir: Path, sharded: bool, kind: str) -> None:
    if sharded:  # loss_fn is then the FSDP root module wrapping the model
        from microtune.training import fsdp

        fsdp.save(loss_fn, out_dir, trainable_only=not methods.spec(kind).capabilities.full_model)
    else:
        model.save_pretrained(out_dir)


def _meta(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in st.items() if k != "step"}


def _validate(model: Any, loss_fn: Callable, valid_set: list, cfg: Any, pad: int, bf16: bool, st: dict[str, Any],
              best: dict[str, Any] | None, on_log: LogFn | None) -> dict[str, Any] | None:
    loss = _valid_loss(model, loss_fn, valid_set, cfg.batch_size, pad, bf16)
    st["valid"].append({"step": st["step"], "valid_loss": loss})
    if on_log:
        on_log(st["step"], {"valid_loss": loss})
    if st["best_loss"] is None or loss < st["best_loss"]:
        st["best_loss"], st["since_best"] = loss, 0
        return trainable_state(model) if cfg.keep_best else None
    st["since_best"] += 1
    return best


def _optimizer(model: Any, cfg: Any, steps: int) -> tuple[Any, Any]:
    import torch
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(steps * cfg.warmup_ratio)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, steps)


def _valid_loss(model: Any, loss_fn: Callable, rows: list[tuple[list[int], list[int]]], batch_size: int, pad: int, bf16: bool) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(bf16):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device()) for k, v in collate(rows[start:start + batch_size], pad).items()}
            loss, n = loss_fn(batch)
            total, count = total + loss.item() * n, count + n
    if release := getattr(loss_fn, "release", None):  # FSDP: free what these forwards gathered (no backward does it)
        release()
    model.train()
    return total / max(count, 1)
