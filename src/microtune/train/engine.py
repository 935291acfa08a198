"""The training engine: LoRA on a causal LM, loss on completion tokens only.

    result = train_adapter(recipe, dataset_dir, out_dir, on_log=print)

Speed choices (measured in benchmarks/): the LM head runs only at positions that carry a label
(with a 49k vocabulary it is a large share of the work otherwise), batches are length-bucketed, and
matmuls run under bf16 autocast where the hardware has native bf16.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.data import read_split
from microtune.models import BaseModelRef, apply_method, load_model, load_tokenizer, param_counts
from microtune.tasks import get_task
from microtune.tasks.render import Renderer
from microtune.train.batching import collate, count_batches, iterate_epochs
from microtune.models.hardware import autocast, device, peak_memory_mb, seed_everything, use_bf16

LogFn = Callable[[int, dict[str, float]], None]


def completion_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Mean cross-entropy over completion tokens; the LM head sees only those positions."""
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep]), int(keep.sum())


def encode_split(rows: list[dict[str, Any]], task: Any, renderer: Renderer, max_len: int) -> list[tuple[list[int], list[int]]]:
    return [renderer.encode(task.messages(r), task.target(r), max_len) for r in rows]


def train_adapter(recipe: Recipe, ref: BaseModelRef, dataset_dir: Path, labels: list[str], out_dir: Path,
                  on_log: LogFn | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune and save the adapter + tokenizer into ``out_dir``; returns cost and history."""
    import torch

    cfg = recipe.train
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(ref)
    renderer, task = Renderer(tokenizer), get_task(recipe.task, labels)
    train_set = encode_split(read_split(dataset_dir, "train"), task, renderer, cfg.max_seq_len)
    valid_set = encode_split(read_split(dataset_dir, "valid"), task, renderer, cfg.max_seq_len)
    model = load_model(ref, recipe.model.trust_remote_code)
    model.config.use_cache = False
    model = apply_method(model, recipe.method, cfg.seed).to(device())
    bf16 = use_bf16(cfg.bf16)
    lengths = [len(p) + len(c) for p, c in train_set]
    micro_batches = count_batches(lengths, cfg.batch_size, cfg.epochs)
    steps = math.ceil(micro_batches / cfg.grad_accum)
    optimizer, scheduler = _optimizer(model, cfg, steps)
    history: list[dict[str, float]] = []
    pad = tokenizer.pad_token_id
    tokens_seen, start = 0, time.perf_counter()
    model.train()
    with _progress(progress) as bar:
        task_id = bar.add_task("training", total=steps, loss=float("nan"), tps=0.0)
        window_loss, window_n, step = 0.0, 0, 0
        for i, (epoch, idx) in enumerate(iterate_epochs(lengths, cfg.batch_size, cfg.seed, cfg.epochs)):
            batch = {k: v.to(device()) for k, v in collate([train_set[j] for j in idx], pad).items()}
            with autocast(bf16):
                loss, _ = completion_loss(model, batch)
            (loss / cfg.grad_accum).backward()
            tokens_seen += int(batch["attention_mask"].sum())
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            if (i + 1) % cfg.grad_accum and i + 1 != micro_batches:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - start
            record = {"loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                      "tokens_per_s": tokens_seen / elapsed}
            bar.update(task_id, advance=1, loss=record["loss"], tps=record["tokens_per_s"])
            if step % cfg.log_every == 0 or step == steps:
                history.append({"step": step, **record})
                if on_log:
                    on_log(step, record)
            window_loss, window_n = 0.0, 0
    wall = time.perf_counter() - start
    valid_loss = _valid_loss(model, valid_set, cfg.batch_size, pad, bf16) if valid_set else None
    if on_log and valid_loss is not None:
        on_log(step, {"valid_loss": valid_loss})
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "history": history,
        "final": {"train_loss": history[-1]["loss"] if history else None, "valid_loss": valid_loss, "steps": step},
        "cost": {**param_counts(model), "tokens_seen": tokens_seen, "wall_time_s": round(wall, 2),
                 "peak_memory_mb": round(peak_memory_mb(), 1), "device": device(), "bf16": bf16},
    }


def _optimizer(model: Any, cfg: Any, steps: int) -> tuple[Any, Any]:
    import torch
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(steps * cfg.warmup_ratio)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, steps)


def _valid_loss(model: Any, rows: list[tuple[list[int], list[int]]], batch_size: int, pad: int, bf16: bool) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(bf16):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device()) for k, v in collate(rows[start:start + batch_size], pad).items()}
            loss, n = completion_loss(model, batch)
            total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )
