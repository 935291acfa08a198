"""Prediction speed and accuracy for `classify` on the demo's test slice: microtune's predictor vs `generate` loops.

    .venv/bin/python benchmarks/predict_speed.py [--examples 90] [--repeats 3] [--train-steps 60] [--adapter DIR]

Main table — the micro-model: the bundled SmolLM2-135M-Instruct + one LoRA adapter (trained here with
`microtune.pipeline.train` on the demo recipe for --train-steps optimizer steps in a temporary
workspace, unless --adapter names one), the plain micro prompt (instruction + text), same model object
for every system, batch size 16 where batched:
  - microtune: shared-prefix KV cache + batched trie-constrained decoding (`LabelPredictor`)
  - no prefix cache: the same batched constrained decoder without the shared-prefix cache
  - generate batched (free): `model.generate`, greedy, left padding, batch 16, rows sorted by length
    (as microtune does), stopping at the end-of-turn token, `max_new_tokens` = the longest label
    completion (the least a free decoder needs), answer mapped to a label by `task.parse`
  - generate one by one (free): the same, one example at a time (the usual loop)
Second table — the base model prompted zero-shot (instruction + label list): microtune vs batched free
`generate`, to show what free decoding answers without an adapter (the valid-label rate).
Reports examples/s (median of --repeats runs; each run predicts every example), the ratio to each
`generate` peer, the valid-label rate and accuracy. Writes both tables into BENCHMARKS.md between the
predict-speed markers. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from microtune.config import load_recipe
from microtune.data import build_dataset
from microtune.models import LabelPredictor, load_model, load_tokenizer, load_trained, resolve_base
from microtune.models.hardware import autocast, device, use_bf16
from microtune.tasks import get_task
from microtune.tasks.render import Renderer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/banking-intents.yaml"
BATCH = 16


def generate_free(model, tok, renderer, prompts, task, bf16, batch_size: int) -> list[str | None]:
    """Greedy `generate` with left padding, `batch_size` rows at a time; answers mapped by `task.parse`."""
    max_new = max(len(renderer.completion_ids(label)) for label in task.candidates())
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    preds: list[str | None] = [None] * len(prompts)
    tok.padding_side = "left"
    with torch.no_grad(), autocast(bf16):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tok.pad({"input_ids": [prompts[i] for i in idx]}, padding=True, return_tensors="pt").to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=renderer.stop_id)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                preds[i] = task.parse(tok.decode(out[row, width:], skip_special_tokens=True))
    return preds


def timed(fn: Callable[[], list], repeats: int) -> tuple[float, list]:
    times, preds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        preds = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), preds


def measure(systems: dict[str, Callable[[], list]], golds: list[str], repeats: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for name, fn in systems.items():
        seconds, preds = timed(fn, repeats)
        rate = len(golds) / seconds
        valid = sum(p is not None for p in preds) / len(preds)
        acc = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        rows.append((name, rate, valid, acc))
        print(f"{name:38s} {rate:7.1f} ex/s  valid {valid:.2f}  acc {acc:.3f}", flush=True)
    return rows


def table(rows: list[tuple[str, float, float, float]], peers: list[str], repeats: int) -> str:
    rate = {n: r for n, r, _, _ in rows}
    head = f"| system | examples/s (median of {repeats}) | " + " | ".join(f"× {p}" for p in peers) + " | valid-label rate | accuracy |"
    lines = [head, "|---|---:|" + "---:|" * len(peers) + "---:|---:|"]
    for n, r, v, a in rows:
        ratios = " | ".join(f"{r / rate[p]:.1f}×" for p in peers)
        lines.append(f"| {n} | {r:.1f} | {ratios} | {v:.2f} | {a:.3f} |")
    return "\n".join(lines)


def train_adapter(steps: int, workspace: Path) -> Path:
    from microtune.pipeline import train

    return train(RECIPE, overrides=[f"train.max_steps={steps}", "tracking.register_model=false"], workspace=workspace)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--adapter", type=Path, default=None, help="an adapter folder of the demo recipe; default: train one")
    args = ap.parse_args()
    recipe = load_recipe(RECIPE)
    data = build_dataset(recipe)
    test = data.splits["test"][: args.examples]
    golds = [ex["label"] for ex in test]
    ref = resolve_base(recipe.model)
    tok = load_tokenizer(ref)
    renderer, task = Renderer(tok), get_task(recipe.task, data.labels)
    bf16 = use_bf16("auto")

    with tempfile.TemporaryDirectory() as ws:
        adapter = args.adapter or train_adapter(args.train_steps, Path(ws))
        model = load_trained(ref, adapter).eval()
        micro = [renderer.encode(task.messages(ex), task.target(ex), recipe.train.max_seq_len)[0] for ex in test]
        print(f"adapter {adapter}", flush=True)
        main_rows = measure({
            "microtune (prefix cache + trie)": lambda: [p for p, _ in LabelPredictor(model, renderer, data.labels, BATCH, bf16).predict(micro)],
            "no prefix cache (trie)": lambda: [p for p, _ in LabelPredictor(model, renderer, data.labels, BATCH, bf16,
                                                                            share_prefix=False).predict(micro)],
            "generate batched (free)": lambda: generate_free(model, tok, renderer, micro, task, bf16, BATCH),
            "generate one by one (free)": lambda: generate_free(model, tok, renderer, micro, task, bf16, 1),
        }, golds, args.repeats)

    base = load_model(ref).to(device()).eval()
    zero = [renderer.prompt_ids(task.messages(ex, label_list=True)) for ex in test]
    zero_rows = measure({
        "microtune (prefix cache + trie)": lambda: [p for p, _ in LabelPredictor(base, renderer, data.labels, BATCH, bf16).predict(zero)],
        "generate batched (free)": lambda: generate_free(base, tok, renderer, zero, task, bf16, BATCH),
    }, golds, args.repeats)

    source = f"--adapter {args.adapter}" if args.adapter else f"--train-steps {args.train_steps}"
    trained = f"the adapter {args.adapter.name} (given)" if args.adapter else f"a LoRA adapter trained {args.train_steps} steps here"
    load = os.getloadavg()[0]
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    how = (f"`{env}.venv/bin/python benchmarks/predict_speed.py --examples {args.examples} --repeats {args.repeats} {source}` — "
           f"first {len(test)} demo test rows (CLINC150 banking, 30 intents), bundled SmolLM2-135M-Instruct, bf16 autocast={bf16}, "
           f"{torch.get_num_threads()} threads, batch {BATCH}, greedy; 1-minute load average at the end {load:.1f} on {os.cpu_count()} CPUs "
           "(a load above the CPU count means other processes shared the cores: absolute rates drop, ratios within the run hold better).")
    body = ("## Prediction speed (classify)\n\n" + how + "\n\n"
            f"Micro-model (base + {trained}; plain micro prompt):\n\n"
            + table(main_rows, ["generate batched (free)", "generate one by one (free)"], args.repeats)
            + "\n\nBase model prompted zero-shot (instruction + label list), no adapter:\n\n"
            + table(zero_rows, ["generate batched (free)"], args.repeats))
    _write_section("predict-speed", body)


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
