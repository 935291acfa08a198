"""The prompted baselines on phee-ade (extract): micro-F1 and JSON-valid rate of zero-shot and few-shot, with
whatever decoder the microtune on PYTHONPATH has (run it once on the code before and once after a change).

    PYTHONPATH=src .venv/bin/python benchmarks/extract_baselines.py [--examples 32] [--workspace /tmp/ws]

Exactly eval's path for these two systems: `pipeline.check` on recipes/phee-ade.yaml (the bundled
SmolLM2-135M-Instruct), the first --examples test rows (eval.max_examples), the fixed seeded shots
(eval.shots = 3), the prompts of `evaluation.runner`, its `_predictor` (batch 16, greedy, max_new_tokens 80)
and `task.parse` / `task.metrics`. Prints one Markdown row per system and the seconds it took.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from microtune import pipeline
from microtune.config import load_recipe
from microtune.data import read_split
from microtune.evaluation.runner import _predictor, pick_shots
from microtune.models import load_model, load_tokenizer, resolve_base
from microtune.tasks import get_task
from microtune.tasks.render import Renderer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--workspace", default=None)
    args = p.parse_args()
    recipe = load_recipe(ROOT / "recipes" / "phee-ade.yaml")
    ws = args.workspace or tempfile.mkdtemp(prefix="extract-baselines-")
    dataset = pipeline.check(recipe, workspace=ws).dataset_dir
    test, train = read_split(dataset, "test")[: args.examples], read_split(dataset, "train")
    task = get_task(recipe.task, [])
    ref = resolve_base(recipe.model)
    renderer = Renderer(load_tokenizer(ref))
    model = load_model(ref).eval()
    shots = pick_shots(train, recipe.eval.shots, recipe.eval.seed)
    golds = [task.gold(ex) for ex in test]
    print(f"torch threads {torch.get_num_threads()}, {len(test)} test rows, max_new_tokens {task.decoder().max_new_tokens}")
    print("| system | micro-F1 | micro-F1 normalised | JSON-valid rate | seconds |")
    print("|---|---:|---:|---:|---:|")
    for system, few in (("zero_shot", ()), ("few_shot", shots)):
        ids = [renderer.prompt_ids(task.messages(ex, label_list=True, shots=few)) for ex in test]
        start = time.perf_counter()
        raw = [text for text, _ in _predictor(task, model, renderer, recipe.eval.batch_size, False).predict(ids)]
        seconds = time.perf_counter() - start
        m = task.metrics(golds, [task.parse(r) for r in raw])
        print(f"| {system} | {m['micro_f1']:.3f} | {m['micro_f1_normalized']:.3f} | {m['valid_rate']:.3f} | {seconds:.0f} |", flush=True)
        print(f"<!-- {system} first answers: {raw[:2]!r} -->")


if __name__ == "__main__":
    main()
