"""Training-step speed on the demo data: microtune's engine vs the plain Hugging Face loss path.

    .venv/bin/python benchmarks/train_speed.py [--steps 20] [--repeats 3]

Same model (bundled SmolLM2-135M + LoRA r=16 all-linear), same batches (demo train split, batch 8),
bf16 autocast where supported. Configurations, each in a fresh process, alternated `--repeats` times:
  - hf-full-head: `model(input_ids, attention_mask, labels=...)` — the LM head over every position
    (what PEFT + transformers.Trainer / TRL SFT compute per step)
  - microtune: the engine's step (`completion_loss`: the LM head only at completion positions)
Reports tokens/s (median over repeats of the mean over steps after 3 warm-up steps) and the ratio to
hf-full-head. Writes the table into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["hf-full-head", "microtune"]


def one(config: str, steps: int) -> float:
    import torch

    from microtune.config import load_recipe
    from microtune.data import build_dataset
    from microtune.models import apply_method, load_model, load_tokenizer, resolve_base
    from microtune.models.hardware import autocast, use_bf16
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer
    from microtune.train.batching import bucketed_batches, collate
    from microtune.train.engine import completion_loss, encode_split

    recipe = load_recipe(ROOT / "recipes/banking-intents.yaml")
    data = build_dataset(recipe)
    ref = resolve_base(recipe.model)
    tok = load_tokenizer(ref)
    rows = encode_split(data.splits["train"], get_task(recipe.task, data.labels), Renderer(tok), 128)
    torch.manual_seed(0)
    model = apply_method(load_model(ref), recipe.method, 0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = bucketed_batches([len(p) + len(c) for p, c in rows], 8, seed=0)
    bf16, tokens, seconds = use_bf16("auto"), 0, 0.0
    for i, idx in enumerate(batches[: steps + 3]):
        batch = collate([rows[j] for j in idx], tok.pad_token_id)
        start = time.perf_counter()
        with autocast(bf16):
            if config == "hf-full-head":
                loss = model(**batch).loss
            else:
                loss, _ = completion_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        print(json.dumps({"tps": one(args.config, args.steps)}))
        return
    results: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.repeats):
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--config", config, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            results[config].append(json.loads(out.stdout.strip().splitlines()[-1])["tps"])
            print(f"repeat {r + 1} {config:28s} {results[config][-1]:7.1f} tok/s", flush=True)
    medians = {c: statistics.median(v) for c, v in results.items()}
    table = ["| configuration | tokens/s (median) | runs | × hf-full-head |", "|---|---:|---|---:|"]
    table += [f"| {c} | {m:.0f} | {', '.join(f'{x:.0f}' for x in results[c])} | {m / medians['hf-full-head']:.2f}× |"
              for c, m in medians.items()]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from predict_speed import _write_section

    _write_section("train-speed", "## Training step speed (LoRA, CPU)\n\n"
                   f"`.venv/bin/python benchmarks/train_speed.py --steps {args.steps} --repeats {args.repeats}` — demo "
                   "train split, batch 8, LoRA r=16 all-linear, bundled SmolLM2-135M, bf16 autocast where supported.\n\n"
                   + "\n".join(table))


if __name__ == "__main__":
    main()
