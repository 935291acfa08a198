"""Prediction speed for `classify` on the demo's test slice: microtune's predictor vs plain loops.

    .venv/bin/python benchmarks/predict_speed.py [--examples 90] [--repeats 3]

Systems, same model (bundled SmolLM2-135M), same zero-shot prompts (instruction + label list):
  - microtune: shared-prefix KV cache + batched trie-constrained decoding (LabelPredictor)
  - no-prefix: the same batched constrained decoder without the shared-prefix cache
  - generate-1by1: `model.generate` one example at a time, greedy, free decoding (the usual loop)
Reports examples/s (median of --repeats runs), the ratio to generate-1by1, and the valid-label rate.
Writes the table into BENCHMARKS.md between the predict-speed markers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from microtune.config import load_recipe
from microtune.data import build_dataset
from microtune.models import LabelPredictor, load_model, load_tokenizer, resolve_base
from microtune.models.hardware import autocast, use_bf16
from microtune.tasks import get_task
from microtune.tasks.render import Renderer

ROOT = Path(__file__).resolve().parents[1]


def generate_one_by_one(model, tok, prompts, task, bf16):
    preds = []
    with torch.no_grad(), autocast(bf16):
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
            preds.append(task.parse(tok.decode(out[0, len(p):], skip_special_tokens=True)))
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    recipe = load_recipe(ROOT / "recipes/banking-intents.yaml")
    data = build_dataset(recipe)
    test = data.splits["test"][: args.examples]
    ref = resolve_base(recipe.model)
    tok, model = load_tokenizer(ref), load_model(ref).eval()
    renderer, task = Renderer(tok), get_task(recipe.task, data.labels)
    prompts = [renderer.prompt_ids(task.messages(ex, label_list=True)) for ex in test]
    golds = [ex["label"] for ex in test]
    bf16 = use_bf16("auto")
    systems = {
        "microtune (prefix cache + trie)": lambda: [p for p, _ in LabelPredictor(model, renderer, data.labels, 16, bf16).predict(prompts)],
        "no prefix cache (trie)": lambda: [p for p, _ in LabelPredictor(model, renderer, data.labels, 16, bf16, share_prefix=False).predict(prompts)],
        "generate one by one (free)": lambda: generate_one_by_one(model, tok, prompts, task, bf16),
    }
    rows = []
    for name, fn in systems.items():
        times, preds = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            preds = fn()
            times.append(time.perf_counter() - start)
        rate = len(prompts) / statistics.median(times)
        valid = sum(p is not None for p in preds) / len(preds)
        acc = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        rows.append((name, rate, valid, acc))
        print(f"{name:34s} {rate:7.1f} ex/s  valid {valid:.2f}  acc {acc:.3f}", flush=True)
    base = rows[-1][1]
    table = ["| system | examples/s (median of %d) | × generate-1by1 | valid-label rate | accuracy |" % args.repeats,
             "|---|---:|---:|---:|---:|"]
    table += [f"| {n} | {r:.1f} | {r / base:.1f}× | {v:.2f} | {a:.3f} |" for n, r, v, a in rows]
    _write_section("predict-speed", "## Prediction speed (classify)\n\n" f"`.venv/bin/python benchmarks/predict_speed.py --examples {args.examples} "
                   f"--repeats {args.repeats}` — zero-shot prompts, {len(prompts)} test rows, bundled SmolLM2-135M, "
                   f"bf16={bf16}, {torch.get_num_threads()} threads.\n\n" + "\n".join(table))


def _write_section(key: str, body: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures written by the scripts in benchmarks/.\n"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
