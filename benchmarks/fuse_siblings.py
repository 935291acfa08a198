"""Sibling LoRA fusion (training/fuse.py) measured alone: forward + backward time of one training batch, fused vs PEFT's path.

    PYTHONPATH=src .venv/bin/python benchmarks/fuse_siblings.py [--rows 8] [--repeats 15]

Both models are built in this one process the way the engine builds them (the bundled SmolLM2-135M-Instruct, the demo
recipe's LoRA r=16 on all linear layers, frozen linear weights in bf16, short-eager attention, bf16 autocast), then
timed in alternation on the same batches (the demo train split's first rows, `--rows` a batch, padded as the engine
pads): median seconds per forward + backward of each, their ratio, and the loss of both (equal up to bf16 rounding).
Alternating within one process keeps the machine's load changes out of the ratio, which whole runs of
benchmarks/train_speed.py (±15 % a run on a shared 2-core machine) cannot.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="rows a batch (the engine's default batch size is 8)")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    ap.add_argument("--repeats", type=int, default=15, help="timed forward + backward passes of each model")
    args = ap.parse_args()

    import torch

    from microtune.config import load_recipe
    from microtune.data import build_dataset
    from microtune.models import load_tokenizer, resolve_base
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer
    from microtune.training.batching import collate
    from microtune.training.fuse import fuse_siblings
    from microtune.training.loss import completion_loss
    from microtune.training.setup import build_model, encode_split, precast

    recipe = load_recipe(ROOT / "recipes/banking-intents.yaml", overrides=["train.lr=0.0005", "train.epochs=1", "train.batch_size=8"])
    ref = resolve_base(recipe.model)
    tokenizer = load_tokenizer(ref)
    data = build_dataset(recipe)
    rows = data.splits["train"][:args.rows * args.batches]
    encoded = encode_split(rows, get_task(recipe.task, data.labels), Renderer(tokenizer), recipe.train.max_seq_len)
    batches = [collate(encoded[i:i + args.rows], tokenizer.pad_token_id) for i in range(0, len(rows), args.rows)]
    models = {}
    for name in ("peft", "fused"):
        model = build_model(recipe, ref)
        precast(recipe, model)
        groups = fuse_siblings(model) if name == "fused" else 0
        models[name] = model.train()
        print(f"{name}: {groups} fused groups", flush=True)
    times: dict[str, list[float]] = {name: [] for name in models}
    losses: dict[str, list[float]] = {name: [] for name in models}
    for i in range(args.repeats + 2):
        batch = batches[i % len(batches)]
        for name, model in (models.items() if i % 2 else reversed(models.items())):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = completion_loss(model, batch)
            loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up rounds
                times[name].append(elapsed)
                losses[name].append(loss.item())
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in models:
        print(f"{name:6s} forward+backward {med[name] * 1000:7.1f} ms (median of {len(times[name])}), mean loss "
              f"{statistics.mean(losses[name]):.4f}")
    print(f"fused ÷ peft time: {med['fused'] / med['peft']:.3f}  (speed-up {med['peft'] / med['fused']:.2f}×)")


if __name__ == "__main__":
    main()
