"""QLoRA's matmul dtype on this machine: one forward + backward of the bundled SmolLM2-135M-Instruct under QLoRA (NF4 base,
LoRA r=16 on every linear layer), `method.compute_dtype` bfloat16 vs float32, alternated, median of the timed steps.

    .venv/bin/python benchmarks/qlora_compute_dtype.py [--tokens 32] [--steps 3]

`compute_dtype: auto` picks bf16 only where bf16 matmuls are native (CUDA with bf16, a CPU with AVX512-BF16 or AMX) and
fp32 on other CPUs; this prints the two step times and the ratio that choice rests on, and the CPU's bf16 flags.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from microtune.config import load_recipe
from microtune.models import resolve_base
from microtune.models.hardware import bf16_supported
from microtune.training.setup import build_model

RECIPE = "recipes/banking-intents.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="tokens of the one-row batch (default %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per dtype, after one warm-up step (default %(default)s)")
    args = ap.parse_args()
    models = {}
    for dtype in ("bfloat16", "float32"):
        recipe = load_recipe(RECIPE, ["method.kind=qlora", f"method.compute_dtype={dtype}", "train.bf16=false"])
        models[dtype] = build_model(recipe, resolve_base(recipe.model)).train()
    ids = torch.randint(100, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {d: [] for d in models}
    for step in range(args.steps + 1):
        for dtype, model in models.items():  # alternated, so a load change hits both
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if step:  # the first step of each is a warm-up
                times[dtype].append(time.perf_counter() - start)
    med = {d: statistics.median(t) for d, t in times.items()}
    print(f"native bf16 matmuls here: {bf16_supported()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"1×{args.tokens} tokens, median of {args.steps} steps")
    print("| compute_dtype | s per step | ÷ float32 |\n|---|---:|---:|")
    for dtype in models:
        print(f"| {dtype} | {med[dtype]:.2f} | {med[dtype] / med['float32']:.2f}× |")


if __name__ == "__main__":
    main()
