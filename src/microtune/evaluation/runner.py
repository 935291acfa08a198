"""Evaluate the micro-model against prompted baselines and endpoints on the test split, with intervals.

    metrics = evaluate_systems(recipe, ref, dataset_dir, adapter_dir, labels, out_dir)   # as pipeline.evaluate does
    # reporter: a ``message`` event (stage ``eval``) as each system starts predicting

Systems: ``zero_shot`` (instruction + label list), ``few_shot`` (plus k train examples as chat turns: seeded
and fixed, distinct labels first, or per row the most similar by TF-IDF), the model-free baselines the task
type allows (``classical``: TF-IDF + logistic regression fitted on the train split, classify; ``lead``: the
input's first sentence, generate; one module each, ``MODEL_FREE``), each of ``eval.endpoints`` (an OpenAI-
compatible model asked for the label), and ``micro`` (base + adapter, the plain training prompt). Every system
gives ``(answer, probability or None)`` per row and is timed the same way, so metrics, intervals, paired
tests, the files and the tables treat them all alike. The local language-model systems share the decoders: a
label trie for classify (every answer a valid label), the batch generator with a per-row JSON-schema
constraint for extract (every answer an object with the task's fields), the same generator unconstrained for
generate. Writes into ``out_dir``: predictions.jsonl, metrics.json (per system, with intervals, latency,
throughput, cost), stats.json (intervals + paired tests), shots.json, report.html + PNGs.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.atomic import write_json
from microtune.core.crashpoints import reach
from microtune.core.errors import DataError
from microtune.core.jsonl import write_jsonl
from microtune.core.progress import Reporter, emitter
from microtune.data import read_split
from microtune.data.balance import row_weights
from microtune.evaluation import classical, lead, stats, timing
from microtune.evaluation.endpoint import EndpointSystem
from microtune.models import BaseModelRef, load_model, load_tokenizer
from microtune.models.decoding import LabelPredictor
from microtune.models.generation import TextGenerator
from microtune.models.hardware import device, use_bf16
from microtune.models.trained import load_trained
from microtune.tasks import ClassifyConfig, Task, get_task
from microtune.tasks.render import Renderer

MICRO = "micro"
PREDICT_CHUNK_BATCHES = 8  # predict_examples decodes this many batches between progress events
STAGE = "eval"  # the stage named in this module's events
# baselines that need no language model: name → fit(task, train rows) → an object whose predict(rows) gives (answer, prob)
MODEL_FREE = {classical.NAME: classical.fit, lead.NAME: lead.fit}


def pick_shots(train: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """k examples from train, seeded; one per label first so the prompt shows the label variety."""
    rows = list(train)
    random.Random(seed).shuffle(rows)
    picked, seen = [], set()
    for row in rows:
        if row.get("label") is not None and row["label"] not in seen:  # extract/generate rows have no label
            picked.append(row)
            seen.add(row["label"])
    picked = picked[:k]
    picked += [r for r in rows if r not in picked][: k - len(picked)]
    return picked


def similar_shots(train: list[dict[str, Any]], test: list[dict[str, Any]], k: int) -> list[list[dict[str, Any]]]:
    """Per test row, the k train rows with the highest TF-IDF cosine similarity, most similar last."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True).fit([r["text"] for r in train])
    sims = (vectorizer.transform([r["text"] for r in test]) @ vectorizer.transform([r["text"] for r in train]).T).toarray()
    out = []
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]  # stable: ties keep train order, so the pick is deterministic
        out.append([train[i] for i in reversed(top)])
    return out


def _shots(recipe: Recipe, dataset_dir: Path, test: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    train, cfg = read_split(dataset_dir, "train"), recipe.eval
    if cfg.shot_selection == "similar":
        return similar_shots(train, test, cfg.shots)
    fixed = pick_shots(train, cfg.shots, cfg.seed)
    return [fixed] * len(test)


def preflight(recipe: Recipe) -> None:
    """Checks that need no model: every endpoint's API key is set. Run before any tracking starts, so a
    missing key fails at once with its fix and leaves no failed run behind."""
    for i, endpoint_cfg in enumerate(recipe.eval.endpoints):
        EndpointSystem(endpoint_cfg, [], f"eval.endpoints[{i}]")


def evaluate_systems(recipe: Recipe, ref: BaseModelRef, dataset_dir: Path, adapter_dir: Path, labels: list[str],
                     out_dir: Path, reporter: Reporter | None = None) -> dict[str, Any]:
    """Predict the test split with every system; write the eval files into ``out_dir``; return metrics per system."""
    from microtune.evaluation.report import render_report

    emit = emitter(reporter, STAGE)
    cfg = recipe.eval
    test = read_split(dataset_dir, "test")[: cfg.max_examples]
    if not test:
        raise DataError("the test split is empty", hint="give data.test or a non-zero data.split.test")
    task = get_task(recipe.task, labels)
    shots = _shots(recipe, dataset_dir, test)
    results: dict[str, dict[str, Any]] = {}
    # endpoints first: a wrong URL or key fails in seconds, before minutes of local prediction
    for i, endpoint_cfg in enumerate(cfg.endpoints):
        emit("message", text=f"predicting with {endpoint_cfg.name} …", system=endpoint_cfg.name)
        results[endpoint_cfg.name] = _run_endpoint(EndpointSystem(endpoint_cfg, labels, f"eval.endpoints[{i}]"), task, test)
    _run_model_free(recipe, dataset_dir, task, test, results, emit)
    _run_local(recipe, ref, adapter_dir, task, test, shots, results, emit)
    reach("eval.after_predictions")
    order = [*cfg.baselines, *(e.name for e in cfg.endpoints), MICRO]  # tables read baselines → endpoints → micro
    results = {s: results[s] for s in order}
    golds = [task.gold(ex) for ex in test]
    for r in results.values():
        r["metrics"] = task.metrics(golds, [p for p, _ in r["preds"]]) | r.pop("timing")
    summary = _statistics(recipe, task, golds, results)
    _write(out_dir, test, golds, results, shots, summary)
    render_report(out_dir)
    return {s: r["metrics"] for s, r in results.items()}


def _run_model_free(recipe: Recipe, dataset_dir: Path, task: Task, test: list[dict[str, Any]], results: dict[str, Any], emit: Any) -> None:
    """The baselines without a language model (``MODEL_FREE``): fitted on the train split, timed like the local systems
    (the batched pass over the test rows for throughput, rows alone for latency; the fit is not counted, as training is not)."""
    cfg = recipe.eval
    wanted = [s for s in cfg.baselines if s in MODEL_FREE]
    train = read_split(dataset_dir, "train") if wanted else []
    weights = row_weights(train, recipe.train.balance, recipe.train.balance_power)  # balanced as the micro-model trained
    for system in wanted:
        emit("message", text=f"predicting with {system} …", system=system)
        model = MODEL_FREE[system](task, train, weights)
        start = time.perf_counter()
        preds = model.predict(test)
        seconds = time.perf_counter() - start
        latency = timing.measure_latency(lambda row, m=model: m.predict([row]), test[: cfg.latency_examples])
        results[system] = {"preds": preds, "timing": _timing(len(test), seconds, latency, cfg.usd_per_hour)}


def _run_local(recipe: Recipe, ref: BaseModelRef, adapter_dir: Path, task: Task, test: list[dict[str, Any]],
               shots: list[list[dict[str, Any]]], results: dict[str, Any], emit: Any) -> None:
    """Batched constrained prediction with the base model (baselines), then base + adapter (micro)."""
    cfg, tokenizer = recipe.eval, load_tokenizer(ref)
    renderer = Renderer(tokenizer)
    prompts = {
        "zero_shot": lambda i: renderer.prompt_ids(task.messages(test[i], label_list=True)),
        "few_shot": lambda i: renderer.prompt_ids(task.messages(test[i], label_list=True, shots=shots[i])),
        MICRO: lambda i: renderer.encode(task.messages(test[i]), task.target(test[i]), recipe.train.max_seq_len)[0],
    }
    model = load_model(ref, recipe.model.trust_remote_code, dtype=recipe.model.dtype, attention=recipe.model.attention).to(device())
    bf16 = use_bf16(recipe.train.bf16)
    for system in [*(s for s in cfg.baselines if s in prompts), MICRO]:
        if system == MICRO:
            model = load_trained(ref, adapter_dir, model)
        emit("message", text=f"predicting with {system} …", system=system)
        predictor = _predictor(task, model, renderer, cfg.batch_size, bf16)
        ids = [prompts[system](i) for i in range(len(test))]
        start = time.perf_counter()
        preds = predictor.predict(ids)
        seconds = time.perf_counter() - start
        latency = timing.measure_latency(lambda p, pr=predictor: pr.predict([p]), ids[: cfg.latency_examples])
        results[system] = {"preds": preds, "timing": _timing(len(test), seconds, latency, cfg.usd_per_hour)}
        if task.decoder().kind != "labels":  # generated text: keep the raw text, score the parsed answer
            results[system] |= {"raw": [raw for raw, _ in preds], "preds": [(task.parse(raw), None) for raw, _ in preds]}


def score_examples(recipe: Recipe, ref: BaseModelRef, adapter_dir: Path, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A trained artifact's task metrics on normalised examples (no intervals, no artifact): watch's champion-quality check."""
    from microtune.core.artifacts import read_manifest

    task = get_task(recipe.task, read_manifest(adapter_dir, "adapter")["labels"])
    renderer = Renderer(load_tokenizer(ref))
    model = load_trained(ref, adapter_dir)
    ids = [renderer.encode(task.messages(e), task.target(e), recipe.train.max_seq_len)[0] for e in examples]
    answers = _micro_answers(task, _predictor(task, model, renderer, recipe.eval.batch_size, use_bf16(recipe.train.bf16)), ids)
    return task.metrics([task.gold(e) for e in examples], [a.answer for a in answers])


@dataclass(frozen=True)
class Answer:
    """One micro-model answer: what the task's metrics compare (``answer``), the label probability the trie decoder gives
    (classify; ``None`` for generated answers) and the generated text (extract/generate; ``None`` for a picked label)."""

    answer: Any
    prob: float | None
    raw: str | None


def predict_examples(recipe: Recipe, ref: BaseModelRef, adapter_dir: Path, examples: list[dict[str, Any]],
                     batch_size: int | None = None, reporter: Reporter | None = None) -> list[tuple[Answer, bool]]:
    """The micro-model's answers to input-only examples (no gold answer): ``microtune predict``.

    The prompt and decoder are eval's micro system's: the trained instruction + the text, cut to ``train.max_seq_len``
    as eval cuts it — leaving room for the longest label (classify) or only the end-of-turn marker (generated answers),
    since no gold answer is there to size the room by. Each answer comes with whether its text was cut. Progress:
    ``start``, ``progress`` per chunk of rows, ``done`` events of stage ``predict``."""
    from microtune.core.artifacts import read_manifest

    emit = emitter(reporter, "predict")
    task = get_task(recipe.task, read_manifest(adapter_dir, "adapter")["labels"])
    renderer = Renderer(load_tokenizer(ref))
    room = max(task.candidates() or [""], key=lambda c: len(renderer.completion_ids(c)))
    prompts = [renderer.encode(task.messages(e), room, recipe.train.max_seq_len)[0] for e in examples]
    cut = [len(p) < len(renderer.prompt_ids(task.messages(e))) for p, e in zip(prompts, examples)]
    emit("message", text=f"loading the micro-model {adapter_dir} …")
    size = batch_size or recipe.eval.batch_size
    predictor = _predictor(task, load_trained(ref, adapter_dir), renderer, size, use_bf16(recipe.train.bf16))
    chunk, answers = size * PREDICT_CHUNK_BATCHES, []
    emit("start", 0, len(prompts))
    for start in range(0, len(prompts), chunk):
        answers += _micro_answers(task, predictor, prompts[start:start + chunk])
        emit("progress", len(answers), len(prompts))
    emit("done", len(answers), len(prompts))
    return list(zip(answers, cut))


def _micro_answers(task: Task, predictor: Any, prompts: list[list[int]]) -> list[Answer]:
    """The decoder's output as answers: a picked label with its probability, or generated text parsed by the task."""
    preds = predictor.predict(prompts)
    if task.decoder().kind == "labels":
        return [Answer(label, prob, None) for label, prob in preds]
    return [Answer(task.parse(raw), None, raw) for raw, _ in preds]


def _predictor(task: Task, model: Any, renderer: Renderer, batch_size: int, bf16: bool) -> Any:
    """The task's decoder: a label trie over a closed set, scored as the task says (``trie`` or ``loglik``); else the batch
    generator, greedy, constrained to the task's JSON schema for ``json`` answers (the micro-model and the prompted
    baselines alike) and free for ``free`` ones."""
    spec = task.decoder()
    if spec.kind == "labels":
        return LabelPredictor(model, renderer, spec.candidates, batch_size, bf16, scoring=spec.scoring)
    return TextGenerator(model, renderer, spec.max_new_tokens, batch_size, bf16, schema=spec.schema if spec.kind == "json" else None)


def _timing(n: int, seconds: float, latency: dict[str, Any], usd_per_hour: float | None, cost: dict[str, Any] | None = None) -> dict[str, Any]:
    rate = n / max(seconds, 1e-9)
    cost = cost or timing.local_cost(rate, usd_per_hour)
    return {"examples": n, "seconds": round(seconds, 4), "examples_per_s": rate,
            "latency_ms_p50": latency["p50_ms"], "latency_ms_p95": latency["p95_ms"], "latency_n": latency["n"],
            "usd_per_1k": cost["usd_per_1k"], "cost_basis": cost["basis"]}


def _run_endpoint(endpoint: EndpointSystem, task: Task, test: list[dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    answers = endpoint.predict([task.messages(ex, label_list=True) for ex in test])
    seconds = time.perf_counter() - start
    latency = timing.percentiles_ms([a.seconds for a in answers])
    # An endpoint gives no label probability: its answer is taken as certain (prob None in predictions.jsonl).
    single_label = isinstance(task.cfg, ClassifyConfig) and not task.cfg.multi_label
    preds = [(a.pred if single_label else task.parse(a.raw), None) for a in answers]
    return {"preds": preds, "raw": [a.raw for a in answers],
            "timing": _timing(len(test), seconds, latency, None, endpoint.cost_per_1k(answers))}


def _statistics(recipe: Recipe, task: Task, golds: list[Any], results: dict[str, Any]) -> dict[str, Any]:
    """Bootstrap intervals for every system and paired tests of micro vs each other system."""
    cfg = recipe.eval
    boot = stats.Bootstrap(len(golds), cfg.n_resamples, cfg.seed)
    preds = {s: [p for p, _ in r["preds"]] for s, r in results.items()}
    dists = {s: boot.distribution(golds, preds[s], task.metrics) for s in results}
    intervals = {s: stats.interval_table(results[s]["metrics"], dists[s], cfg.confidence) for s in results}
    classification = task.name == "classify"
    comparisons = {s: stats.compare(golds, preds[MICRO], preds[s], results[MICRO]["metrics"], results[s]["metrics"],
                                    dists[MICRO], dists[s], classification, cfg.confidence) for s in results if s != MICRO}
    for s, r in results.items():
        r["metrics"]["ci"] = {k: [v["low"], v["high"]] for k, v in intervals[s].items()}
        if s in comparisons:
            r["metrics"]["p_value_vs_micro"] = headline_p(comparisons[s], recipe.metric_names()[0])
    decoder = task.decoder()
    scoring = {"label_scoring": decoder.scoring} if decoder.kind == "labels" else {}  # which scorer the local systems used
    return scoring | {"confidence": cfg.confidence, "n_resamples": cfg.n_resamples, "seed": cfg.seed, "main_metric": recipe.metric_names()[0],
            "interval_method": "percentile bootstrap over test rows (one seeded index matrix shared by all systems)",
            "paired_test": ("McNemar mid-p on per-row correctness" if classification and recipe.metric_names()[0] in CORRECTNESS
                            else "paired bootstrap on the main metric"),
            "latency_method": timing.LATENCY_METHOD.format(n=cfg.latency_examples),
            "endpoint_latency_method": timing.ENDPOINT_LATENCY_METHOD,
            "intervals": intervals, "comparisons": comparisons, "hardware": list(timing.hardware())}


CORRECTNESS = ("accuracy", "exact_match")  # main metrics that are the rate of per-row correctness McNemar tests


def headline_p(comparison: dict[str, Any], main_metric: str) -> float:
    """The p-value shown beside a baseline: McNemar's mid-p where the main metric is per-row correctness, else the paired
    bootstrap of the main metric itself (macro-F1 can rise while accuracy falls: a class-balanced model against a
    majority-leaning one, faa-maintenance)."""
    if "mcnemar" in comparison and main_metric in CORRECTNESS:
        return comparison["mcnemar"]["mid_p"]
    return comparison["metrics"].get(main_metric, {}).get("p_value", float("nan"))


def _write(out_dir: Path, test: list[dict[str, Any]], golds: list[Any], results: dict[str, Any],
           shots: list[list[dict[str, Any]]], summary: dict[str, Any]) -> None:
    write_jsonl(out_dir / "predictions.jsonl", (_prediction(i, ex, golds, results) for i, ex in enumerate(test)))
    write_json(out_dir / "metrics.json", {s: r["metrics"] for s, r in results.items()})
    write_json(out_dir / "stats.json", summary)
    fixed = all(s is shots[0] for s in shots)
    write_json(out_dir / "shots.json", {"selection": "fixed" if fixed else "similar", "shots": shots[0] if fixed else shots}, ensure_ascii=False)


def _prediction(i: int, ex: dict[str, Any], golds: list[Any], results: dict[str, Any]) -> dict[str, Any]:
    """One line of predictions.jsonl: the example, its gold answer and every system's prediction (and raw answer)."""
    row = {"source": ex["source"], "text": ex["text"], "gold": golds[i]}
    for s, r in results.items():
        pred, prob = r["preds"][i]
        row[s] = {"pred": pred, "prob": None if prob is None else round(prob, 4)} | ({"raw": r["raw"][i]} if "raw" in r else {})
    return row
