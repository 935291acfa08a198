"""DDP gradient sync: torch's DistributedDataParallel (the engine's ``ddp`` strategy) vs a hand-written all-reduce.

    .venv/bin/python benchmarks/ddp_sync.py [--nproc 2] [--method lora] [--rounds 3] [--steps 3] [--grad-accum 2]

Same job for both variants, in the same torchrun launch (gloo on CPU, NCCL on CUDA): the bundled
SmolLM2-135M-Instruct with ``--method`` (lora r=16 on all linear layers, or full), the first rows of the demo
recipe's train split encoded as the engine encodes them, global batch 8 split across the ranks, ``--grad-accum``
micro-batches per optimizer step, microtune's completion loss scaled by each rank's token share, clipping and
AdamW as in the engine.
  - ddp: ``microtune.training.strategy.Ddp`` — the loss wrapped as DDP's root module, ``no_sync()`` on the
    accumulation micro-batches, gradients all-reduced bucket by bucket during the last micro-batch's backward
    (a comm hook sums instead of averaging).
  - hand: what the engine did before — the plain loss, then after the last backward every gradient summed
    across ranks in flat chunks of 64 tensors (``hand_sum`` below; no overlap with the backward).
Each round builds a fresh model per variant (same seed), runs one untimed step, then ``--steps`` timed
optimizer steps (barrier before and after each); the variants alternate which goes first. Reported: the median
step time of each variant over all timed steps, and per round. The CPU run is meant for 2 gloo ranks on a small
machine; with one process per core there is little room for the overlap DDP buys, so expect a small difference.
Measured on a 2-core CPU shared with other jobs (load 9-12), 3 rounds, grad_accum 2, median s per step:
lora 3×3 steps: ddp 7.26, hand 7.30; full 3×2 steps: ddp 12.23, hand 12.57 — within the round-to-round spread
(6.0-8.8 and 8.8-13.7 s), so DDP is kept for its overlap on real hardware and for dropping the hand-written sync.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/banking-intents.yaml"
BATCH = 8


def hand_sum(params: list[Any]) -> None:
    """Sum gradients across ranks in one flat buffer per 64 tensors (the engine's former ``sum_gradients``)."""
    import torch
    import torch.distributed as tdist

    grads = [p.grad for p in params if p.grad is not None]
    for start in range(0, len(grads), 64):
        chunk = grads[start:start + 64]
        flat = torch.cat([g.reshape(-1) for g in chunk])
        tdist.all_reduce(flat)
        offset = 0
        for g in chunk:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def batches(recipe: Any, ref: Any, n: int) -> list[list[tuple[list[int], list[int]]]]:
    from microtune.data import build_dataset
    from microtune.models import load_tokenizer
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer
    from microtune.training.setup import encode_split

    data = build_dataset(recipe)
    rows = encode_split(data.splits["train"][:n * BATCH], get_task(recipe.task, data.labels), Renderer(load_tokenizer(ref)),
                        recipe.train.max_seq_len)
    return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


def build(recipe: Any, ref: Any, variant: str) -> tuple[Any, Any, Any]:
    """A fresh model in its layout (``ddp``: the engine's DDP strategy; ``hand``: one process's, plus ``hand_sum``)."""
    import torch

    from microtune.training.setup import build_model
    from microtune.training.strategy import Ddp, Single

    model = build_model(recipe, ref)
    strategy = Ddp() if variant == "ddp" else Single()
    strategy.wrap(model, recipe.train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, strategy, optimizer


def one_step(model: Any, strategy: Any, optimizer: Any, variant: str, group: list[list[tuple[list[int], list[int]]]], pad: int) -> float:
    """One optimizer step over ``group`` (global micro-batches); returns its seconds (all ranks aligned)."""
    import torch

    from microtune.training import distributed as dist
    from microtune.training.batching import collate

    params = [p for p in model.parameters() if p.requires_grad]
    dist.barrier()
    start = time.perf_counter()
    for i, rows in enumerate(group):
        batch = collate(dist.shard(rows), pad)
        with strategy.micro_batch(sync=i == len(group) - 1):
            loss, norm = strategy.loss(batch)
            (norm_all,) = dist.all_sums([norm])
            (loss * (norm / norm_all) / len(group)).backward()
    if variant == "hand":
        hand_sum(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step(), optimizer.zero_grad(set_to_none=True)
    dist.barrier()
    return time.perf_counter() - start


def rank_main(args: argparse.Namespace) -> None:
    from microtune.config import FullConfig, load_recipe
    from microtune.models import load_tokenizer, resolve_base
    from microtune.training import distributed as dist

    dist.init()
    recipe = load_recipe(RECIPE, ["train.bf16=false"])  # the recipe's method: lora r=16 on all linear layers
    if args.method == "full":
        recipe = recipe.model_copy(update={"method": FullConfig()})
    ref = resolve_base(recipe.model)
    pad = load_tokenizer(ref).pad_token_id
    data = batches(recipe, ref, (args.steps + 1) * args.grad_accum)
    groups = [data[i:i + args.grad_accum] for i in range(0, len(data), args.grad_accum)]
    times: dict[str, list[list[float]]] = {"ddp": [], "hand": []}
    for r in range(args.rounds):
        for variant in (("ddp", "hand") if r % 2 == 0 else ("hand", "ddp")):
            model, strategy, optimizer = build(recipe, ref, variant)
            one_step(model, strategy, optimizer, variant, groups[0], pad)  # untimed: first-call allocations
            times[variant].append([one_step(model, strategy, optimizer, variant, g, pad) for g in groups[1:]])
            del model, strategy, optimizer
    if dist.is_main():
        print(json.dumps({"method": args.method, "ranks": dist.world_size(), "grad_accum": args.grad_accum, "device": _device(),
                          **{v: {"median_step_s": round(statistics.median([t for rnd in ts for t in rnd]), 4),
                                 "round_medians_s": [round(statistics.median(rnd), 4) for rnd in ts]} for v, ts in times.items()}}))


def _device() -> str:
    from microtune.models.hardware import device

    return device()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=2)
    args = parser.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", __file__, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.exit(subprocess.run(cmd, env=env, check=False).returncode)


if __name__ == "__main__":
    main()
