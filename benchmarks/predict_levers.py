"""Each lever of classify prediction measured alone: `LabelPredictor` before/after, with and without each part, by batch size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict_levers.py --adapter DIR [--examples 45] [--repeats 3] [--before c30f171]
    .venv/bin/python benchmarks/predict_levers.py --adapter DIR --scoring loglik --before 24aaca1

Same rows, model object and micro prompt as benchmarks/predict_speed.py. "before" is `models/decoding.py` at the git
revision --before (one forward of the whole batch per label token, autocast re-casting fp32 weights every forward);
"after" is this checkout's, also with its bf16-held weights or its last-position LM head switched off; then batch sizes;
then batched `generate` with the same weights (and fp32 ones) at several batch sizes. Repeats go round the systems.
With --scoring loglik the levers are those of the full-log-likelihood scorer: before (--before) and after, the token tree
switched off (one sequence per answer), batch sizes, beside the trie walk and batched `generate`; the continuations
scored and the batches that needed a second pruning round are printed too.
Prints a Markdown table (examples/s, median; accuracy) to paste into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import microtune.models.decoding as after
from microtune.config import load_recipe
from microtune.data import build_dataset
from microtune.models import load_tokenizer, load_trained, resolve_base
from microtune.models.hardware import bf16_frozen_weights, use_bf16
from microtune.tasks import get_task
from microtune.tasks.render import Renderer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from predict_speed import RECIPE, generate_free  # noqa: E402


def old_decoding(rev: str):
    """``models/decoding.py`` as it was at ``rev``, imported as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/microtune/models/decoding.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "decoding_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoding_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, required=True, help="an adapter folder of the demo recipe")
    ap.add_argument("--examples", type=int, default=45)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", default="c30f171", help="the git revision whose decoder is 'before'")
    ap.add_argument("--scoring", choices=["trie", "loglik"], default="trie", help="whose levers to time (default %(default)s)")
    args = ap.parse_args()
    recipe = load_recipe(RECIPE)
    data = build_dataset(recipe)
    test = data.splits["test"][: args.examples]
    golds = [ex["label"] for ex in test]
    ref = resolve_base(recipe.model)
    tok = load_tokenizer(ref)
    renderer, task = Renderer(tok), get_task(recipe.task, data.labels)
    bf16 = use_bf16("auto")
    model = load_trained(ref, args.adapter).eval()
    micro = [renderer.encode(task.messages(ex), task.target(ex), recipe.train.max_seq_len)[0] for ex in test]
    before = old_decoding(args.before)
    held = after.bf16_frozen_weights

    def ours(batch: int, weights: bool = True, head: bool = True):
        def run() -> list[str]:
            after.bf16_frozen_weights = held if weights else (lambda model, enabled: contextlib.nullcontext(model))
            try:
                predictor = after.LabelPredictor(model, renderer, data.labels, batch, bf16, scoring="trie")
                predictor.head_kw = predictor.head_kw if head else {}
                return [label for label, _ in predictor.predict(micro)]
            finally:
                after.bf16_frozen_weights = held
        return run

    def old(batch: int, weights: bool = False):
        def run() -> list[str]:
            with bf16_frozen_weights(model, bf16 and weights):
                return [label for label, _ in before.LabelPredictor(model, renderer, data.labels, batch, bf16).predict(micro)]
        return run

    def gen(batch: int, weights: bool = True):
        return lambda: generate_free(model, tok, renderer, micro, task, bf16, batch, weights_bf16=weights)

    counts: dict[str, str] = {}

    def loglik(module, batch: int, every: bool = False, **kw):
        def run() -> list[str]:
            predictor = module.LabelPredictor(model, renderer, data.labels, batch, bf16, scoring="loglik", **kw)
            if every:  # every answer scored (served logprobs): no pruning
                out = [answers[0][0] for answers in predictor.rank(micro)]
            else:
                out = [label for label, _ in predictor.predict(micro)]  # both hold the bf16 weights themselves
            counts[name_of[id(run)]] = (f"{predictor.continued} continuations, "
                                        f"{getattr(predictor, 'second_rounds', '–')} second rounds")
            return out
        return run

    name_of: dict[int, str] = {}
    systems = {
        f"before ({args.before}), batch 16": old(16), "before + bf16-held weights, batch 16": old(16, True),
        "after, batch 16": ours(16), "after without bf16-held weights, batch 16": ours(16, weights=False),
        "after without the last-position LM head, batch 16": ours(16, head=False),
        "after, batch 8": ours(8), "after, batch 32": ours(32), "after, batch 64": ours(64),
        "generate batched, batch 16": gen(16), "generate batched, batch 16, fp32 weights": gen(16, False),
        "generate batched, batch 32": gen(32), "generate batched, batch 64": gen(64),
    }
    if args.scoring == "loglik":
        systems = {
            f"loglik before ({args.before}), batch 16": loglik(before, 16),
            "loglik after, batch 16": loglik(after, 16), "loglik after without the token tree, batch 16": loglik(after, 16, tree=False),
            "loglik after, batch 32": loglik(after, 32), "loglik after, batch 64": loglik(after, 64),
            "loglik after, every answer ranked, batch 16": loglik(after, 16, every=True),
            "loglik after, every answer ranked, without the token tree, batch 16": loglik(after, 16, every=True, tree=False),
            "trie after, batch 16": ours(16), "generate batched, batch 16": gen(16), "generate batched, batch 64": gen(64),
        }
        name_of.update({id(run): name for name, run in systems.items()})
    times: dict[str, list[float]] = {name: [] for name in systems}
    preds: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, run in systems.items():
            start = time.perf_counter()
            preds[name] = run()
            times[name].append(time.perf_counter() - start)
    print(f"| system | examples/s (median of {args.repeats}) | accuracy | work |\n|---|---:|---:|---|")
    for name in systems:
        acc = sum(p == g for p, g in zip(preds[name], golds)) / len(golds)
        print(f"| {name} | {len(golds) / statistics.median(times[name]):.1f} | {acc:.3f} | {counts.get(name, '')} |")
    print(f"\n1-minute load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
