"""Does synthetic data help, and what does the fidelity gate see? Two measurements, figures into BENCHMARKS.md.

    # value: needs a teacher, any OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama, a hosted API), or `local` (default):
    # the recipe's base model served by microtune itself (a weak teacher, but needs no network)
    .venv/bin/python benchmarks/synth_value.py value --base-url http://127.0.0.1:8000/v1 --model NAME \\
        [--api-key-env VAR] [--recipe recipes/banking-intents.yaml] [--real-per-label 5] [--synth-per-label 20] \\
        [--steps 150] [--seeds 13 14]
    # calibrate: no teacher; the real-vs-synthetic AUC when the "synthetic" rows are real ones (the null the gate must
    # pass) and when they carry a generator's tell (what it must flag), over seeded splits of the bundled real data
    .venv/bin/python benchmarks/synth_value.py calibrate [--splits 10]
    # teacher: only the local teacher's answers of the synth-value-tuned setting, timed against `microtune serve` on the
    # tuned teacher with its default batching and with --max-batch 1 (one at a time), alternated
    PYTHONPATH=src .venv/bin/python benchmarks/synth_value.py teacher [--limit 32] [--repeats 1] [--concurrency 8] [--seed 14]

value: from the recipe's train split take ``--real-per-label`` rows per label (drawn with the first seed); ``microtune synth``
writes ``--synth-per-label`` accepted rows per label from them; then two micro-models train with the same
budget (``--steps`` optimizer steps, same batch size, seed, method) — real rows only, and real + synthetic —
and both are evaluated on the recipe's full real test split. Accuracy and macro-F1 come with 95 % bootstrap
intervals (1000 resamples of the test rows) and a paired bootstrap interval of the difference; the filter
cascade's acceptance rate per stage and the fidelity report are recorded beside them, whatever the outcome.

teacher: the wall time of the teacher's answers alone, in the setting of the synth-value-tuned section (banking-intents,
5 real rows per label over the 30 labels, 10 wanted per label, the base model tuned ``--tune-steps`` 40 on the real
rows and asked for one example per request: 450 requests per seed). The slice, recipe and tuned teacher are built as
`value` builds them (the tuned teacher is cached in the workdir), the requests are the synth stage's own plan
(``build_plan``; the first ``--limit`` of them, all with ``--limit 0``), sent by microtune's teacher client (concurrency
``--concurrency``, a fresh answer cache each time, so nothing is answered from cache) to two `microtune serve` processes
on the tuned teacher with the local teacher's settings: the default batching, and ``--max-batch 1`` (one at a time: the
"before"). Filters, probe and fidelity are not run (they take ~10 s of the 450-answer stage: seed 13's cached rerun).
Written between the synth-teacher markers.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "BENCHMARKS.md"


def bootstrap(golds: list[str], preds: list[str | None], other: list[str | None] | None = None, n: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Accuracy and macro-F1 with 95 % intervals; with ``other``, the paired interval of (preds - other)."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    g = np.array(golds, dtype=object)
    p = np.array([x if x is not None else "<invalid>" for x in preds], dtype=object)
    o = np.array([x if x is not None else "<invalid>" for x in other], dtype=object) if other is not None else None

    def scores(idx: np.ndarray) -> tuple[float, float, float, float]:
        acc, f1 = float((g[idx] == p[idx]).mean()), float(f1_score(g[idx], p[idx], average="macro", zero_division=0))
        if o is None:
            return acc, f1, 0.0, 0.0
        return acc, f1, acc - float((g[idx] == o[idx]).mean()), f1 - float(f1_score(g[idx], o[idx], average="macro", zero_division=0))

    point = scores(np.arange(len(g)))
    draws = np.array([scores(rng.integers(0, len(g), len(g))) for _ in range(n)])
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    names = ["accuracy", "macro_f1", "accuracy_gain", "macro_f1_gain"][: 2 if o is None else 4]
    return {k: {"value": point[i], "ci95": [float(lo[i]), float(hi[i])]} for i, k in enumerate(names)}


# -- value -------------------------------------------------------------------------------------------------------
def write_slice(recipe_path: Path, work: Path, per_label: int, seed: int, n_labels: int | None = None) -> dict[str, Any]:
    from microtune.config import load_recipe
    from microtune.data import build_dataset

    recipe = load_recipe(recipe_path)
    data = build_dataset(recipe)
    rng, by_label = random.Random(seed), {}
    for row in data.splits["train"]:
        by_label.setdefault(row["label"], []).append(row)
    labels = sorted(by_label)[:n_labels]
    train = [r for label in labels for r in rng.sample(by_label[label], min(per_label, len(by_label[label])))]
    valid, test = ([r for r in data.splits[s] if r["label"] in labels] for s in ("valid", "test"))
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows))
    return {"recipe": recipe, "labels": labels, "train": len(train), "test": len(test)}


def value_recipe(args: argparse.Namespace, base: dict[str, Any], work: Path, seed: int) -> Path:
    recipe = base["recipe"]
    raw = {
        "name": "synth-value",
        "task": {"type": "classify", "instruction": recipe.task.instruction, "labels": base["labels"]},
        "data": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"},
        "model": recipe.model.model_dump(mode="json"),
        "method": recipe.method.model_dump(mode="json"),
        "train": {**recipe.train.model_dump(mode="json"), "max_steps": args.steps, "seed": seed, "save_steps": None},
        "eval": {"baselines": [], "batch_size": recipe.eval.batch_size, "metrics": ["accuracy", "macro_f1"],
                 "max_examples": args.max_test},
        "tracking": {"register_model": False},
        "synth": {"per_label": args.synth_per_label, "seed": seed,
                  "teacher": {"base_url": args.base_url, "model": args.model, "api_key_env": args.api_key_env,
                              "concurrency": args.concurrency, "tune_steps": args.tune_steps},
                  "mix": {"max_ratio": args.max_ratio}},
    }
    path = work / f"recipe-{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def micro_preds(eval_dir: Path) -> tuple[list[str], list[str | None]]:
    rows = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    return [r["gold"] for r in rows], [r["micro"]["pred"] for r in rows]


def run_value(args: argparse.Namespace) -> None:
    from rich.console import Console

    from microtune import pipeline
    from microtune.console import ConsoleReporter

    work = Path(args.workdir).resolve()
    base = write_slice(ROOT / args.recipe, work, args.real_per_label, args.seeds[0], args.labels)
    results = []
    for seed in args.seeds:
        recipe = value_recipe(args, base, work, seed)
        start = time.perf_counter()
        syn_dir = pipeline.synth(recipe, workspace=work / "ws")
        synth_s = time.perf_counter() - start
        syn = json.loads((syn_dir / "manifest.json").read_text())
        systems = {}
        # a set the fidelity gate refused (or too small to test) is not mixed in: the real-only model is still reported
        mixes = (("real", "false"), ("real+synthetic", "true")) if syn["fidelity"]["passed"] else (("real", "false"),)
        for name, mix in mixes:
            adapter = pipeline.train(recipe, [f"synth.mix.enabled={mix}"], work / "ws", ConsoleReporter(Console(stderr=True), bars=False))
            eval_dir = pipeline.evaluate(recipe, None, work / "ws", adapter)
            systems[name] = {"adapter": str(adapter), "preds": micro_preds(eval_dir),
                             "train_rows": json.loads((adapter / "manifest.json").read_text()).get("synthetic", {})}
        golds, real_preds = systems["real"]["preds"]
        mixed = systems.get("real+synthetic")
        results.append({"seed": seed, "synth_seconds": round(synth_s, 1), "synthetic": {k: syn[k] for k in (
            "plan", "usage", "filters", "accepted", "accepted_per_stratum", "fidelity")},
            "real": bootstrap(golds, real_preds),
            "real+synthetic": bootstrap(golds, mixed["preds"][1], real_preds) if mixed else None,
            "mix": mixed["train_rows"] if mixed else {}})
        print(json.dumps(results[-1], indent=1, default=str), flush=True)
    (work / "synth_value.json").write_text(json.dumps(results, indent=2, default=str))
    write_section(args.section, value_markdown(args, base, results), Path(args.bench_file))


def _ci(m: dict[str, Any]) -> str:
    return f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def value_markdown(args: argparse.Namespace, base: dict[str, Any], results: list[dict[str, Any]]) -> str:
    cmd = " ".join(["benchmarks/synth_value.py", *sys.argv[1:]])
    cmd = cmd if args.base_url == "local" else cmd.replace(args.base_url, "<BASE_URL>")
    teacher = (f"the local teacher (`microtune serve` on the recipe's base model, {base['recipe'].model.base}"
               + (f", first fine-tuned {args.tune_steps} steps on the real rows to answer synth requests, one example each)"
                  if args.tune_steps else ")") if args.base_url == "local" else f"teacher `{args.model}`")
    test = f"first {args.max_test} of {base['test']}" if args.max_test else str(base["test"])
    kind = ("local teacher, tuned" if args.tune_steps else "local teacher, as it is") if args.base_url == "local" else args.model
    lines = [f"## Synthetic data: real only vs real + synthetic (same training budget; {kind})", "",
             f"`.venv/bin/python {cmd}` — {args.real_per_label} real rows per label from `{args.recipe}` "
             f"({base['train']} rows, {len(base['labels'])} labels), {args.synth_per_label} accepted synthetic rows per label "
             f"wanted, {teacher}; {args.steps} optimizer steps each; eval on the real test split "
             f"({test} rows); 95 % bootstrap intervals (1000 resamples), paired for the gain.", "",
             "| seed | system | train rows | accuracy | macro-F1 | accuracy gain | macro-F1 gain |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        used = r["mix"].get("used", 0)
        lines.append(f"| {r['seed']} | real | {base['train']} | {_ci(r['real']['accuracy'])} | {_ci(r['real']['macro_f1'])} | | |")
        m = r["real+synthetic"]
        if m is None:
            fid = r["synthetic"]["fidelity"]
            why = (f"{r['synthetic']['accepted']} rows accepted, too few for the fidelity test" if fid["auc"] is None
                   else f"fidelity gate failed (AUC {fid['auc']:.3f} > {fid['max_auc']})")
            lines.append(f"| {r['seed']} | real + synthetic | — | not trained: {why} | | | |")
            continue
        lines.append(f"| {r['seed']} | real + synthetic | {base['train']} + {used} | {_ci(m['accuracy'])} | {_ci(m['macro_f1'])} | "
                     f"{_ci(m['accuracy_gain'])} | {_ci(m['macro_f1_gain'])} |")
    lines += ["", "| seed | stage | entered | rejected | pass rate |", "|---|---|---:|---:|---:|"]
    for r in results:
        for stage, row in r["synthetic"]["filters"].items():
            rate = "—" if row["pass_rate"] is None else f"{row['pass_rate']:.1%}"
            lines.append(f"| {r['seed']} | {stage} | {row['entered'] if row['entered'] is not None else '—'} | {row['rejected']} | {rate} |")
    for r in results:
        s = r["synthetic"]
        u, auc = s["usage"], s["fidelity"]["auc"]
        lines.append(f"\nseed {r['seed']}: fidelity {'passed' if s['fidelity']['passed'] else 'FAILED'} (real-vs-synthetic AUC "
                     f"{'n/a' if auc is None else f'{auc:.3f}'}); teacher {u['requests']} requests ({u['from_cache']} from cache), "
                     f"{u['prompt_tokens'] + u['cached_prompt_tokens']:,} prompt + {u['completion_tokens'] + u['cached_completion_tokens']:,} "
                     f"completion tokens, synth stage {r['synth_seconds']} s")
    return "\n".join(lines)


# -- teacher -----------------------------------------------------------------------------------------------------
def teacher_requests(args: argparse.Namespace, work: Path) -> tuple[Any, Path, list[Any]]:
    """``(recipe, tuned teacher folder, the synth stage's teacher requests)`` of the synth-value-tuned setting."""
    from microtune.config import load_recipe
    from microtune.data import read_split
    from microtune.pipeline.check import check
    from microtune.pipeline.local_teacher import tuned_teacher
    from microtune.synthesis import synth_config, synth_hooks
    from microtune.synthesis.cache import AnswerCache
    from microtune.synthesis.plan import build_plan, quotas, split_holdout, strata, with_strata
    from microtune.synthesis.stage import _request
    from microtune.synthesis.teacher import Teacher

    base = write_slice(ROOT / args.recipe, work, args.real_per_label, args.seed, args.labels)
    path = value_recipe(args, base, work, args.seed)
    merged = tuned_teacher(load_recipe(path), work / "ws")  # trained once per slice and seed, then reused from the workdir
    # what served_teacher hands the stage: the running server as the teacher, one example per request (tuned teacher)
    recipe = load_recipe(path, ["synth.teacher.base_url=http://127.0.0.1:1/v1", f"synth.teacher.model={merged}",
                                "synth.examples_per_request=1"])
    checked = check(recipe, None, work / "ws")
    labels, cfg = checked.manifest["labels"], synth_config(recipe)
    hooks = synth_hooks(recipe, labels)
    _, pool = split_holdout(with_strata(read_split(checked.dataset_dir, "train"), hooks), cfg.fidelity.holdout, cfg.seed)
    names = strata(hooks, labels, pool)
    plan = build_plan(cfg, hooks, names, pool, quotas(cfg, names, pool, hooks, recipe.task.type))
    cache = AnswerCache(work / "plan-cache.sqlite")  # only to build the requests (keys); never read for answers
    try:
        requests = [_request(Teacher(cfg.teacher, cache), cfg, p) for p in plan]
    finally:
        cache.close()
    return recipe, merged, requests[: args.limit or None]


def run_teacher(args: argparse.Namespace) -> None:
    import os
    import tempfile

    from microtune.config import TeacherConfig
    from microtune.synthesis import synth_config
    from microtune.synthesis.cache import AnswerCache
    from microtune.synthesis.teacher import Teacher

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import start, stop

    work = Path(args.workdir).resolve()
    recipe, merged, requests = teacher_requests(args, work)
    cfg = synth_config(recipe).teacher
    tmp = Path(tempfile.mkdtemp(prefix="synth-teacher-"))
    common = ["--base", str(merged), "--no-registry", "--poll", "0", "--timeout", "600", "--max-tokens", str(max(cfg.max_tokens, 16))]
    servers = {"batched (default --max-batch 32)": (8751, []), "one at a time (--max-batch 1)": (8752, ["--max-batch", "1"])}
    procs, runs = [], {name: [] for name in servers}
    try:
        for port, extra in servers.values():
            procs.append(start([sys.executable, "-m", "microtune.cli", "serve", "--port", str(port), *common, *extra], port,
                               tmp / f"{port}.log", args.threads))
        for r in range(args.repeats):
            for name, (port, _) in servers.items():
                url = f"http://127.0.0.1:{port}/v1"
                teacher_cfg = TeacherConfig.model_validate(cfg.model_dump() | {"base_url": url, "concurrency": args.concurrency})
                cache = AnswerCache(tmp / f"answers-{port}-{r}.sqlite")  # fresh: every request goes to the server
                try:
                    t0 = time.perf_counter()
                    answers = Teacher(teacher_cfg, cache).ask_all(requests)
                    wall = time.perf_counter() - t0
                finally:
                    cache.close()
                done = [a for a in answers.values() if a.error is None]
                runs[name].append({"wall": wall, "answers": len(done), "errors": len(answers) - len(done),
                                   "completion_tokens": sum(a.completion_tokens for a in done),
                                   "prompt_tokens": sum(a.prompt_tokens for a in done)})
                print(f"round {r + 1} {name:34s} {wall:7.1f}s  {runs[name][-1]}", flush=True)
    finally:
        for proc in procs:
            stop(proc)
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    body = teacher_markdown(args, len(requests), runs, load, os.cpu_count())
    print(body)
    if not args.no_write:
        write_section("synth-teacher", body, Path(args.bench_file))


def teacher_markdown(args: argparse.Namespace, n: int, runs: dict[str, list[dict[str, Any]]], load: str, cpus: int | None) -> str:
    alone = statistics.median(r["wall"] for r in runs["one at a time (--max-batch 1)"])
    cmd = " ".join(["benchmarks/synth_value.py", *sys.argv[1:]])
    lines = ["## Local synth teacher: wall time of its answers, batched vs one at a time (CPU)", "",
             f"`PYTHONPATH=src .venv/bin/python {cmd}` — the synth-value-tuned setting ({args.real_per_label} real rows per label "
             f"from `{args.recipe}`, {args.synth_per_label} wanted per label, the base model tuned {args.tune_steps} steps, one "
             f"example per request, seed {args.seed}): the synth stage's own first {n} teacher requests (of 450 in the full "
             f"run), sent by microtune's teacher client with concurrency {args.concurrency} and a fresh answer cache to "
             "`microtune serve` on the tuned teacher (the local teacher's settings), default batching vs `--max-batch 1`, "
             f"alternated, medians of {args.repeats}; filters and fidelity not run. {args.threads} torch thread(s) per "
             f"server; 1-minute load average at the end {load} on {cpus} CPUs.", "",
             f"| teacher server | wall s (median of {args.repeats}) | × one at a time | s per answer | answers | errors | "
             "completion tokens | completion tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        last = rs[-1]
        lines.append(f"| {name} | {wall:.1f} | {alone / wall:.1f}× | {wall / max(n, 1):.2f} | {last['answers']} | {last['errors']} | "
                     f"{last['completion_tokens']} | {last['completion_tokens'] / last['wall']:.1f} |")
    return "\n".join(lines)


# -- calibrate ---------------------------------------------------------------------------------------------------
TELLS = {
    "chatty": lambda t: f"Dear support team, {t}. Thank you kindly for your prompt assistance!",
    "polished": lambda t: t[:1].upper() + t[1:] + ("." if not t.endswith((".", "?", "!")) else ""),
}


def run_calibrate(args: argparse.Namespace) -> None:
    from microtune.synthesis.fidelity import two_sample

    table = []
    for name, path in (("CLINC150 banking", "recipes/data/clinc150-banking/train.jsonl"),
                       ("FAA maintenance", "recipes/data/faa-maintenance/train.jsonl")):
        texts = [json.loads(line)["text"] for line in (ROOT / path).read_text().splitlines()]
        for n_real, n_syn in ((45, 300), (150, 300)):
            aucs: dict[str, list[float]] = {"null (real as synthetic)": [], **{f"tell: {k}": [] for k in TELLS}}
            for split in range(args.splits):
                rows = random.Random(split).sample(texts, n_real + n_syn)
                real, other = rows[:n_real], rows[n_real:]
                aucs["null (real as synthetic)"].append(two_sample(real, other, 5, split)[0])
                for k, tell in TELLS.items():
                    aucs[f"tell: {k}"].append(two_sample(real, [tell(t) for t in other], 5, split)[0])
            for case, values in aucs.items():
                table.append((name, n_real, n_syn, case, statistics.median(values), min(values), max(values)))
                print(table[-1], flush=True)
    lines = ["## Fidelity gate calibration (no teacher)", "",
             f"`.venv/bin/python benchmarks/synth_value.py calibrate --splits {args.splits}` — real-vs-synthetic AUC "
             "(TF-IDF word+char n-grams, logistic regression, 5-fold) over seeded random splits of the bundled train "
             "slices: the null puts real rows in both samples (the gate must pass it), the tells rewrite the "
             "\"synthetic\" sample (chatty: greeting + thanks; polished: capital first letter + final full stop).", "",
             "| data | real rows | synthetic rows | case | AUC median | min | max |", "|---|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {d} | {r} | {s} | {c} | {med:.3f} | {lo:.3f} | {hi:.3f} |" for d, r, s, c, med, lo, hi in table]
    write_section("synth-calibrate", "\n".join(lines))


def write_section(marker: str, body: str, bench: Path = BENCH) -> None:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = bench.read_text() if bench.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    bench.write_text(text)
    print(f"wrote the {marker} section of {bench}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("value", help="real only vs real + synthetic (needs a teacher endpoint)")
    v.add_argument("--base-url", default="local", help="OpenAI-compatible endpoint ending in /v1, or `local` (the default): "
                   "the recipe's base model served by microtune itself")
    v.add_argument("--model", default=None, help="model name the endpoint serves (not needed with `local`)")
    v.add_argument("--tune-steps", type=int, default=None, help="with `local`: synth.teacher.tune_steps (teach the base model "
                   "the request format on the real rows first)")
    v.add_argument("--section", default="synth-value", help="marker of the BENCHMARKS.md section to (re)write")
    v.add_argument("--labels", type=int, default=None, help="use the first N labels (sorted) only, train and test alike")
    v.add_argument("--api-key-env", default=None, help="environment variable holding the API key (none: no key)")
    v.add_argument("--recipe", default="recipes/banking-intents.yaml")
    v.add_argument("--real-per-label", type=int, default=5)
    v.add_argument("--synth-per-label", type=int, default=20)
    v.add_argument("--max-ratio", type=float, default=10.0, help="synth.mix.max_ratio (synthetic rows per real row)")
    v.add_argument("--steps", type=int, default=150, help="optimizer steps of both models (the same budget)")
    v.add_argument("--seeds", type=int, nargs="+", default=[13])
    v.add_argument("--concurrency", type=int, default=8)
    v.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test rows only (default: all)")
    v.add_argument("--workdir", default=".microtune/bench-synth-value")
    v.add_argument("--bench-file", default=str(BENCH), help="Markdown file whose synth-value section is (re)written")
    c = sub.add_parser("calibrate", help="AUC of the fidelity test under the null and with generator tells (no teacher)")
    c.add_argument("--splits", type=int, default=10)
    t = sub.add_parser("teacher", help="wall time of the local (tuned) teacher's answers: batched server vs one at a time")
    t.add_argument("--limit", type=int, default=32, help="the first N teacher requests of the plan (0: all 450)")
    t.add_argument("--repeats", type=int, default=1, help="rounds per server, alternating")
    t.add_argument("--concurrency", type=int, default=8, help="requests in flight (the recipe default; the 28-minute run used 2)")
    t.add_argument("--seed", type=int, default=14, help="the synth-value-tuned seed whose plan is sent (14: its 450 answers were not cached)")
    t.add_argument("--threads", type=int, default=1, help="torch (OpenMP) threads of each server")
    t.add_argument("--recipe", default="recipes/banking-intents.yaml")
    t.add_argument("--labels", type=int, default=None)
    t.add_argument("--real-per-label", type=int, default=5)
    t.add_argument("--synth-per-label", type=int, default=10)
    t.add_argument("--tune-steps", type=int, default=40)
    t.add_argument("--workdir", default=".microtune/bench-synth-teacher")
    t.add_argument("--bench-file", default=str(BENCH))
    t.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    t.set_defaults(base_url="local", model=None, api_key_env=None, steps=120, max_test=None, max_ratio=10.0)
    args = ap.parse_args()
    {"value": run_value, "calibrate": run_calibrate, "teacher": run_teacher}[args.cmd](args)


if __name__ == "__main__":
    main()
