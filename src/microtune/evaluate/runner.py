"""Evaluate the micro-model against the same base model prompted by hand, on the test split.

Systems: ``zero_shot`` (instruction + label list), ``few_shot`` (plus k seeded train examples as
chat turns, distinct labels first), ``micro`` (base + adapter, the plain training prompt). All use
the same constrained decoder, so every system answers a valid label and the comparison is fair.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.data import read_split
from microtune.models import BaseModelRef, load_model, load_tokenizer
from microtune.models.decoding import LabelPredictor, TextGenerator
from microtune.models.hardware import device, use_bf16
from microtune.models.trained import load_trained
from microtune.tasks import get_task
from microtune.tasks.render import Renderer

MICRO = "micro"


def pick_shots(train: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """k examples from train, seeded; one per label first so the prompt shows the label variety."""
    rows = list(train)
    random.Random(seed).shuffle(rows)
    picked, seen = [], set()
    for row in rows:
        if row.get("label") is not None and row["label"] not in seen:
            picked.append(row)
            seen.add(row["label"])
    picked = picked[:k]
    picked += [r for r in rows if r not in picked][: k - len(picked)]
    return picked


def evaluate_systems(recipe: Recipe, ref: BaseModelRef, dataset_dir: Path, adapter_dir: Path, labels: list[str],
                     out_dir: Path, on_system: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Predict the test split with every system; write predictions.jsonl and metrics.json into ``out_dir``."""
    cfg = recipe.eval
    test = read_split(dataset_dir, "test")[: cfg.max_examples]
    if not test:
        from microtune.core.errors import DataError

        raise DataError("the test split is empty", hint="give data.test or a non-zero data.split.test")
    tokenizer = load_tokenizer(ref)
    renderer, task = Renderer(tokenizer), get_task(recipe.task, labels)
    shots = pick_shots(read_split(dataset_dir, "train"), cfg.shots, cfg.seed)
    max_len = recipe.train.max_seq_len
    prompts = {
        "zero_shot": lambda ex: renderer.prompt_ids(task.messages(ex, label_list=True)),
        "few_shot": lambda ex: renderer.prompt_ids(task.messages(ex, label_list=True, shots=shots)),
        MICRO: lambda ex: renderer.encode(task.messages(ex), task.target(ex), max_len)[0],
    }
    model = load_model(ref, recipe.model.trust_remote_code).to(device())
    bf16 = use_bf16(recipe.train.bf16)
    results: dict[str, Any] = {}
    for system in [*cfg.baselines, MICRO]:
        if system == MICRO:
            model = load_trained(ref, adapter_dir, model)
        if on_system:
            on_system(system)
        predictor = _predictor(task, model, renderer, cfg.batch_size, bf16)
        start = time.perf_counter()
        preds = predictor.predict([prompts[system](ex) for ex in test])
        seconds = time.perf_counter() - start
        preds = [(task.parse(raw), prob, raw) for raw, prob in preds]
        metrics = task.metrics([task.gold(ex) for ex in test], [p for p, _, _ in preds])
        metrics.update(examples=len(test), seconds=round(seconds, 2), examples_per_s=round(len(test) / seconds, 2))
        results[system] = {"metrics": metrics, "preds": preds}
    _write(out_dir, test, results, shots, task)
    return {s: r["metrics"] for s, r in results.items()}


def _predictor(task: Any, model: Any, renderer: Renderer, batch_size: int, bf16: bool) -> Any:
    """Constrained decoding over the task's answers when it has a closed set; greedy generation otherwise."""
    candidates = task.candidates()
    if candidates is not None:
        return LabelPredictor(model, renderer, candidates, batch_size, bf16)
    return TextGenerator(model, renderer, task.cfg.max_new_tokens, batch_size, bf16)


def _entry(pred: Any, prob: float | None, raw: str) -> dict[str, Any]:
    """One system's answer: the parsed prediction, its probability (constrained decoding) or raw text (generation)."""
    return {"pred": pred, "prob": round(prob, 4)} if prob is not None else {"pred": pred, "raw": raw}


def _write(out_dir: Path, test: list[dict[str, Any]], results: dict[str, Any], shots: list[dict[str, Any]], task: Any) -> None:
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, ex in enumerate(test):
            row = {"source": ex["source"], "text": ex["text"], "gold": task.gold(ex)}
            row |= {s: _entry(*r["preds"][i]) for s, r in results.items()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    metrics = {s: r["metrics"] for s, r in results.items()}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "shots.json").write_text(json.dumps(shots, indent=2, ensure_ascii=False) + "\n")
