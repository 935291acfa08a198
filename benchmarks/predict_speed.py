"""Prediction speed and accuracy for `classify` on the demo's test slice: microtune's predictor vs `generate` loops.

    .venv/bin/python benchmarks/predict_speed.py [--examples 90] [--repeats 3] [--train-steps N] [--adapter DIR]

Main table — the micro-model: the bundled SmolLM2-135M-Instruct + one LoRA adapter (trained here with
`microtune.pipeline.train` on the demo recipe in a temporary workspace — its own 3 epochs, the micro-model `make demo`
serves, or --train-steps optimizer steps — unless --adapter names one), the plain micro prompt (instruction + text), same model object
and the same weights for every system, at each batch size of --batches (the first is the reference):
  - microtune, loglik (the default scorer): shared-prefix KV cache, every label ranked by its full log-likelihood,
    continuing only the labels whose first-token log-probability can still win
  - microtune, trie: shared-prefix KV cache + trie-constrained decoding (`LabelPredictor`: the prompt forward's
    last position picks the first label token; the rows still undecided finish in one more forward)
  - no prefix cache: the same constrained decoder without the shared-prefix cache
  - generate batched (free): `model.generate`, greedy, left padding, rows sorted by length (as
    microtune does), stopping at the end-of-turn token, `max_new_tokens` = the longest label
    completion (the least a free decoder needs), answer mapped to a label by `task.parse`
  - generate one by one (free): the same, one example at a time (the usual loop)
Weights: under bf16 autocast microtune holds the frozen Linear weights in bf16 while it predicts
(`bf16_frozen_weights`: the values autocast would cast them to on every forward, so the answers are
bit-identical); the `generate` peers run with the same bf16 weights, and once more as before (fp32
weights re-cast by autocast on every forward) for reference.
Second table — the base model prompted zero-shot (instruction + label list): microtune vs batched free
`generate`, to show what free decoding answers without an adapter (the valid-label rate).
Reports examples/s (median of --repeats runs, taken round the systems in turn; each run predicts every example), the ratio to each
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
from microtune.models.hardware import autocast, bf16_frozen_weights, device, use_bf16
from microtune.tasks import get_task
from microtune.tasks.render import Renderer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/banking-intents.yaml"
BATCHES = "16,64"


def generate_free(model, tok, renderer, prompts, task, bf16, batch_size: int, weights_bf16: bool = True) -> list[str | None]:
    """Greedy `generate` with left padding, `batch_size` rows at a time; answers mapped by `task.parse`. With
    ``weights_bf16`` the frozen Linear weights are held in bf16 as microtune's predictor holds them (same weights)."""
    with bf16_frozen_weights(model, bf16 and weights_bf16):
        return _generate(model, tok, renderer, prompts, task, bf16, batch_size)


def _generate(model, tok, renderer, prompts, task, bf16, batch_size: int) -> list[str | None]:
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


def measure(systems: dict[str, Callable[[], list]], golds: list[str], repeats: int) -> list[tuple[str, float, float, float]]:
    """Examples/s (median over ``repeats``), valid-label rate and accuracy per system. The repeats go round the systems
    (one run of each, then again), so a change in the machine's load falls on every system alike."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    preds: dict[str, list] = {}
    for _ in range(repeats):
        for name, fn in systems.items():
            start = time.perf_counter()
            preds[name] = fn()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in systems:
        rate = len(golds) / statistics.median(times[name])
        valid = sum(p is not None for p in preds[name]) / len(golds)
        acc = sum(p == g for p, g in zip(preds[name], golds)) / len(golds)
        rows.append((name, rate, valid, acc))
        print(f"{name:55s} {rate:7.1f} ex/s  valid {valid:.2f}  acc {acc:.3f}", flush=True)
    return rows


def table(rows: list[tuple[str, float, float, float]], peers: list[str], repeats: int) -> str:
    rate = {n: r for n, r, _, _ in rows}
    head = f"| system | examples/s (median of {repeats}) | " + " | ".join(f"× {p}" for p in peers) + " | valid-label rate | accuracy |"
    lines = [head, "|---|---:|" + "---:|" * len(peers) + "---:|---:|"]
    for n, r, v, a in rows:
        ratios = " | ".join(f"{r / rate[p]:.1f}×" for p in peers)
        lines.append(f"| {n} | {r:.1f} | {ratios} | {v:.2f} | {a:.3f} |")
    return "\n".join(lines)


def labels(predictor: LabelPredictor, prompts: list[list[int]]) -> list[str]:
    return [label for label, _ in predictor.predict(prompts)]


def best_line(rows: list[tuple[str, float, float, float]]) -> str:
    """Each system at its own best batch size: each microtune scorer's fastest row against batched `generate`'s fastest
    (same weights)."""
    peer = max((r for r in rows if r[0].startswith("generate batched") and "fp32" not in r[0]), key=lambda r: r[1])
    lines = []
    for scorer in ("loglik", "trie"):
        ours = max((r for r in rows if r[0].startswith(f"microtune (prefix cache + {scorer}")), key=lambda r: r[1])
        lines.append(f"Each at its best batch size: {ours[0]} {ours[1]:.1f} examples/s vs {peer[0]} {peer[1]:.1f} examples/s: "
                     f"**{ours[1] / peer[1]:.2f}×**.")
    return "\n".join(lines)


def train_adapter(steps: int | None, workspace: Path) -> Path:
    from microtune.pipeline import train

    steps_kw = [] if steps is None else [f"train.max_steps={steps}"]
    return train(RECIPE, overrides=[*steps_kw, "tracking.register_model=false"], workspace=workspace)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=None,
                    help="optimizer steps of the adapter trained here (default: the recipe's own schedule, 3 epochs; a short run is "
                         "less peaked, which slows loglik's pruning)")
    ap.add_argument("--adapter", type=Path, default=None, help="an adapter folder of the demo recipe; default: train one")
    ap.add_argument("--batches", default=BATCHES, help="comma-separated batch sizes for microtune and batched generate; the first is the "
                    "reference, the others give each system the chance of its best batch size (default %(default)s)")
    args = ap.parse_args()
    recipe = load_recipe(RECIPE)
    data = build_dataset(recipe)
    test = data.splits["test"][: args.examples]
    golds = [ex["label"] for ex in test]
    batches = [int(b) for b in args.batches.split(",")]
    ref_batch = batches[0]
    ref = resolve_base(recipe.model)
    tok = load_tokenizer(ref)
    renderer, task = Renderer(tok), get_task(recipe.task, data.labels)
    bf16 = use_bf16("auto")

    with tempfile.TemporaryDirectory() as ws:
        adapter = args.adapter or train_adapter(args.train_steps, Path(ws))
        model = load_trained(ref, adapter).eval()
        micro = [renderer.encode(task.messages(ex), task.target(ex), recipe.train.max_seq_len)[0] for ex in test]
        print(f"adapter {adapter}", flush=True)
        systems: dict[str, Callable[[], list]] = {}
        for b in batches:
            systems[f"microtune (prefix cache + loglik, the default), batch {b}"] = lambda b=b: labels(
                LabelPredictor(model, renderer, data.labels, b, bf16, scoring="loglik"), micro)
        for b in batches:
            systems[f"microtune (prefix cache + trie), batch {b}"] = lambda b=b: labels(LabelPredictor(model, renderer, data.labels, b, bf16,
                                                                                              scoring="trie"), micro)
        systems[f"no prefix cache (trie), batch {ref_batch}"] = lambda: labels(LabelPredictor(model, renderer, data.labels, ref_batch, bf16,
                                                                                           share_prefix=False, scoring="trie"), micro)
        for b in batches:
            systems[f"generate batched (free), batch {b}"] = lambda b=b: generate_free(model, tok, renderer, micro, task, bf16, b)
        systems[f"generate batched (free), batch {ref_batch}, fp32 weights"] = lambda: generate_free(model, tok, renderer, micro, task, bf16,
                                                                                                   ref_batch, weights_bf16=False)
        systems["generate one by one (free)"] = lambda: generate_free(model, tok, renderer, micro, task, bf16, 1)
        main_rows = measure(systems, golds, args.repeats)

    base = load_model(ref).to(device()).eval()
    zero = [renderer.prompt_ids(task.messages(ex, label_list=True)) for ex in test]
    zero_rows = measure({
        "microtune (prefix cache + loglik, the default)": lambda: labels(LabelPredictor(base, renderer, data.labels, ref_batch, bf16,
                                                                                       scoring="loglik"), zero),
        "microtune (prefix cache + trie)": lambda: labels(LabelPredictor(base, renderer, data.labels, ref_batch, bf16, scoring="trie"), zero),
        "generate batched (free)": lambda: generate_free(base, tok, renderer, zero, task, bf16, ref_batch),
    }, golds, args.repeats)

    batch_arg = "" if args.batches == BATCHES else f" --batches {args.batches}"
    source = (f" --adapter {args.adapter}" if args.adapter else "" if args.train_steps is None else f" --train-steps {args.train_steps}")
    trained = (f"the adapter {args.adapter.name} (given)" if args.adapter else "a LoRA adapter trained here, the recipe's 3 epochs"
               if args.train_steps is None else f"a LoRA adapter trained {args.train_steps} steps here")
    load = os.getloadavg()[0]
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    how = (f"`{env}.venv/bin/python benchmarks/predict_speed.py --examples {args.examples} --repeats {args.repeats}{source}{batch_arg}` — "
           f"first {len(test)} demo test rows (CLINC150 banking, 30 intents), bundled SmolLM2-135M-Instruct, bf16 autocast={bf16}, "
           f"{torch.get_num_threads()} threads, batch sizes {args.batches}, greedy; "
           f"1-minute load average at the end {load:.1f} on {os.cpu_count()} CPUs "
           "(a load above the CPU count means other processes shared the cores: absolute rates drop, ratios within the run hold better).")
    body = ("## Prediction speed (classify)\n\n" + how + "\n\n"
            f"Micro-model (base + {trained}; plain micro prompt):\n\n"
            + table(main_rows, [f"generate batched (free), batch {ref_batch}", "generate one by one (free)"], args.repeats)
            + "\n\n" + best_line(main_rows)
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
