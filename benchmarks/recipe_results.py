"""Run every bundled recipe end to end and write the README's results table (baselines vs micro-model).

    .venv/bin/python benchmarks/recipe_results.py                       # all recipes, fresh runs
    .venv/bin/python benchmarks/recipe_results.py --only phee-ade scitldr
    .venv/bin/python benchmarks/recipe_results.py --table-only          # rebuild the table from earlier runs
    .venv/bin/python benchmarks/recipe_results.py --only banking-intents --tuned 20m   # defaults, then tuned
    .venv/bin/python benchmarks/recipe_results.py --trial-fit 20m       # trials of each recipe's settings in 20 minutes

With --tuned BUDGET each recipe is then tuned (`microtune tune`, Optuna on the train and valid splits only, BUDGET of
wall time, the recipe's default search space) and the tuned recipe is run into WORKSPACE/tuned with the micro-model
alone (the baselines are the defaults run's: same test split); a second table sets the tuned micro-model against the
defaults' on the test split (paired: McNemar mid-p on per-row correctness, paired bootstrap otherwise), with the
trials, the search's minutes and the settings it chose. Tuning never reads the test split.

Each recipe runs with `microtune.pipeline.run` (check → train → eval → register) on its bundled defaults
into one workspace (`--workspace`, default .microtune-results). The table is built from the eval
artifacts alone: the recipe's main metric for each system with its 95 % bootstrap interval, the
micro-model's paired test against the best baseline (McNemar mid-p for classification, paired bootstrap
otherwise), and the wall time of the run. It replaces the block between the recipe-results markers in
README.md and BENCHMARKS.md. Nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["banking-intents", "clinc150-oos", "cuad-clauses", "faa-maintenance", "phee-ade", "scitldr"]


def run_recipe(name: str, workspace: Path, micro_only: bool = False) -> float:
    from rich.console import Console

    from microtune import pipeline
    from microtune.console import ConsoleReporter

    start = time.perf_counter()
    pipeline.run(ROOT / "recipes" / f"{name}.yaml", overrides=["eval.baselines=[]"] if micro_only else None, workspace=workspace,
                 reporter=ConsoleReporter(Console(stderr=True), bars=False))
    seconds = time.perf_counter() - start
    times = _read_times(workspace)
    times[name] = round(seconds, 1)
    (workspace / "recipe-times.json").write_text(json.dumps(times, indent=2) + "\n")
    return seconds


def tune_recipe(name: str, workspace: Path, budget_s: float, tune_set: list[str] | None = None) -> dict[str, Any]:
    """Tune one recipe for ``budget_s`` (valid split only), then run its tuned recipe into ``workspace / 'tuned'`` with no
    baselines; what the search found is kept in ``workspace / 'tuned' / 'tune-results.json'``. ``tune_set``: recipe
    overrides for the search (``tune.holdout=0.15``), recorded with the result."""
    from rich.console import Console

    from microtune import pipeline
    from microtune.config import load_recipe
    from microtune.console import ConsoleReporter

    reporter = ConsoleReporter(Console(stderr=True), bars=False)
    start = time.perf_counter()
    # a Recipe object, not the path: the tuned recipe lands in the study's folder (paths resolved), not in recipes/
    result = pipeline.tune(load_recipe(ROOT / "recipes" / f"{name}.yaml", tune_set), workspace=workspace, reporter=reporter, budget_s=budget_s)
    searched = time.perf_counter() - start
    if result.tuned_recipe is None:
        raise SystemExit(f"{name}: no trial of the tune study finished within the budget; give --tuned a longer one")
    start = time.perf_counter()
    pipeline.run(result.tuned_recipe, overrides=["eval.baselines=[]"], workspace=workspace / "tuned", reporter=reporter)
    found = {"tune_minutes": round(searched / 60, 1), "run_minutes": round((time.perf_counter() - start) / 60, 1),
             "trials": result.counts, "valid": {result.metric: result.best_value}, "overrides": result.overrides,
             "tune_set": list(tune_set or [])}
    path = workspace / "tuned" / "tune-results.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    done[name] = found
    path.write_text(json.dumps(done, indent=2) + "\n")
    return found


def tuned_table(workspace: Path) -> str:
    """Defaults vs tuned micro-model per recipe on the test split, from the two runs' eval artifacts."""
    import numpy as np

    from microtune.config import load_recipe
    from microtune.core.artifacts import read_manifest
    from microtune.core.jsonl import read_jsonl
    from microtune.evaluation.runner import CORRECTNESS
    from microtune.evaluation.stats import mcnemar
    from microtune.evaluation.stats import paired_bootstrap_p as resampled_p
    from microtune.pipeline.gate import paired_bootstrap_p
    from microtune.tasks import get_task

    path = workspace / "tuned" / "tune-results.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    lines = ["| recipe | main metric | defaults | tuned | tuned − defaults [95 % interval] | p | trials (complete / pruned) "
             "| search | settings chosen |", "|---|---|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        before, after = _latest_eval(workspace, name), _latest_eval(workspace / "tuned", name)
        if before is None or after is None or name not in found:
            continue
        m_before, m_after = (json.loads((d / "manifest.json").read_text()) for d in (before, after))
        if m_before.get("test_hash") != m_after.get("test_hash"):
            raise SystemExit(f"{name}: the defaults and tuned evals read different test splits; rerun both")
        main = m_after["main_metric"]
        labels = read_manifest(Path(m_after["dataset_dir"]), "dataset")["labels"]
        task = get_task(load_recipe(ROOT / "recipes" / f"{name}.yaml").task, labels)  # tuning leaves the task as it is
        rows_a, rows_b = read_jsonl(before / "predictions.jsonl"), read_jsonl(after / "predictions.jsonl")
        golds = [r["gold"] for r in rows_a]
        a = task.example_scores(golds, [r["micro"]["pred"] for r in rows_a])
        b = task.example_scores(golds, [r["micro"]["pred"] for r in rows_b])
        if [r["text"] for r in rows_a] != [r["text"] for r in rows_b]:
            raise SystemExit(f"{name}: the two evals list the test rows in different orders")
        preds_a, preds_b = [r["micro"]["pred"] for r in rows_a], [r["micro"]["pred"] for r in rows_b]
        point_a, point_b = float(task.metrics(golds, preds_a)[main]), float(task.metrics(golds, preds_b)[main])
        idx = np.random.default_rng(13).integers(0, len(golds), size=(1000, len(golds)))  # the same resampled rows for both
        deltas = [float(task.metrics([golds[i] for i in rows], [preds_b[i] for i in rows])[main])
                  - float(task.metrics([golds[i] for i in rows], [preds_a[i] for i in rows])[main]) for rows in idx]
        lo, hi = np.percentile(deltas, [2.5, 97.5])
        if task.has_labels and main in CORRECTNESS:
            p = mcnemar([x == 1.0 for x in a], [x == 1.0 for x in b])["p_value"]
        elif task.has_labels:  # macro-F1 does not split into per-row scores: the bootstrap of the metric itself
            p = resampled_p(np.asarray(deltas), np.zeros(len(deltas)), point_b - point_a)
        else:
            p = paired_bootstrap_p(a, b)
        info = found[name]
        counts = info["trials"]
        search_set = "".join(f" `{o}`" for o in info.get("tune_set", []))  # what the search ran with (tune.holdout=…)
        lines.append(f"| `{name}` | {main} | {point_a:.3f} | {point_b:.3f} | {point_b - point_a:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                     f"| {'< 0.001' if p < 0.001 else f'{p:.3f}'} | {counts.get('complete', 0)} / {counts.get('pruned', 0)} "
                     f"| {info['tune_minutes']:.0f} min{search_set} | {', '.join(f'`{_short(o)}`' for o in info['overrides']) or '—'} |")
    return "\n".join(lines)


def trial_fit(workspace: Path, budget_s: float) -> str:
    """How many trials of each recipe's own settings a tuning budget holds, from the defaults runs' artifacts: the
    adapter's training wall time plus the micro-model's eval rate applied to the valid rows (what a trial does)."""
    lines = ["| recipe | train rows | steps | training (s) | valid rows | scoring valid (s) | one trial (min) | "
             f"trials in {budget_s / 60:g} min |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in RECIPES:
        found = _latest_eval(workspace, name)
        if found is None:
            continue
        adapter = workspace / name / "adapters" / found.name
        if not (adapter / "manifest.json").is_file():
            continue
        manifest = json.loads((adapter / "manifest.json").read_text())
        rows = json.loads((Path(manifest["dataset_dir"]) / "manifest.json").read_text())["stats"]["rows"]
        micro = json.loads((found / "metrics.json").read_text())["micro"]
        train_s = manifest["cost"]["wall_time_s"]
        score_s = micro["seconds"] / micro["examples"] * rows["valid"]
        trial = train_s + score_s
        lines.append(f"| `{name}` | {rows['train']:,} | {manifest['final']['steps']} | {train_s:.0f} | {rows['valid']} | {score_s:.0f} | "
                     f"{trial / 60:.1f} | {budget_s / trial:.1f} |")
    return "\n".join(lines)


def _short(override: str) -> str:
    """``train.lr=0.004041365384011066`` → ``train.lr=0.00404``: a drawn float to 3 significant digits, for the table."""
    key, _, value = override.partition("=")
    try:
        return f"{key}={float(value):.3g}" if "." in value or "e" in value else override
    except ValueError:
        return override


def _read_times(workspace: Path) -> dict[str, float]:
    path = workspace / "recipe-times.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _latest_eval(workspace: Path, name: str) -> Path | None:
    folder = workspace / name / "evals"
    done = sorted(p for p in folder.glob("*") if (p / "manifest.json").is_file() and "-on-" not in p.name) if folder.is_dir() else []
    return done[-1] if done else None


def _cell(values: dict[str, Any], metric: str) -> str:
    ci = values.get("ci", {}).get(metric)
    return f"{values[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


MODEL_FREE = ("classical", "lead")  # the baselines without a language model: one column, whichever the task has
PROMPTED = ("zero_shot", "few_shot")


def _p_text(stats: dict[str, Any], system: str | None) -> str:
    """The micro-model's p-value against ``system`` by the eval's own rule (``evaluation.runner.headline_p``), read from
    its paired tests: an eval written before the rule changed shows what the rule gives now."""
    from microtune.evaluation.runner import headline_p

    comparison = stats["comparisons"].get(system) if system else None
    p = headline_p(comparison, stats["main_metric"]) if comparison else None
    return "—" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}") + f" ({system})"


def table(workspace: Path) -> str:
    """One row per recipe from its latest eval: the prompted baselines, the model-free one, the micro-model, and the
    micro-model's paired test against the best prompted baseline and against the model-free one."""
    times = _read_times(workspace)
    lines = ["| recipe | task | main metric | zero-shot | few-shot | classical / lead | micro-model "
             "| p vs best prompted | p vs classical / lead | run time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in RECIPES:
        eval_dir = _latest_eval(workspace, name)
        if eval_dir is None:
            continue
        manifest = json.loads((eval_dir / "manifest.json").read_text())
        metrics, main = manifest["metrics"], manifest["main_metric"]
        stats = json.loads((eval_dir / "stats.json").read_text())
        task = json.loads((Path(manifest["adapter_dir"]) / "recipe.json").read_text())["task"]["type"]
        prompted = [s for s in PROMPTED if s in metrics]
        best = max(prompted, key=lambda s: metrics[s][main]) if prompted else None
        free = next((s for s in MODEL_FREE if s in metrics), None)
        seconds = times.get(name)
        cells = [_cell(metrics[s], main) if s in metrics else "—" for s in PROMPTED]
        cells += [f"{_cell(metrics[free], main)} ({free})" if free else "—", _cell(metrics["micro"], main)]
        lines.append(f"| `{name}` | {task} | {main} | " + " | ".join(cells) +
                     f" | {_p_text(stats, best)} | {_p_text(stats, free)} | {'—' if seconds is None else f'{seconds / 60:.1f} min'} |")
    return "\n".join(lines)


def merged(path: Path, body: str) -> str:
    """``body`` with the rows of the recipes it lacks taken from the results block already in ``path``, in recipe order."""
    text = path.read_text()
    start, end = "<!-- recipe-results:start -->", "<!-- recipe-results:end -->"
    old = text[text.index(start): text.index(end)] if start in text else ""

    def rows(block: str) -> dict[str, str]:
        return {name: line for line in block.splitlines() for name in RECIPES if line.startswith(f"| `{name}` |")}

    new, kept = rows(body), rows(old)
    lines = [line for line in body.splitlines() if not any(line.startswith(f"| `{n}` |") for n in RECIPES)]
    table_rows = [new.get(name) or kept.get(name) for name in RECIPES]
    return "\n".join(lines + [r for r in table_rows if r])


def write_block(path: Path, body: str) -> None:
    write_block_named(path, "recipe-results", body)


def write_block_named(path: Path, key: str, body: str) -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` (appended when missing)."""
    text = path.read_text()
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = text[: text.index(start)] + block + text[text.index(end) + len(end):] if start in text else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=ROOT / ".microtune-results")
    ap.add_argument("--only", nargs="*", choices=RECIPES, help="run only these recipes (the table keeps the others' last results)")
    ap.add_argument("--table-only", action="store_true", help="do not run; rebuild the table from the workspace")
    ap.add_argument("--conditions", default="", help="how the runs were made (threads, machine load), printed with the table")
    ap.add_argument("--no-write", action="store_true", help="print the tables only; leave README.md and BENCHMARKS.md as they are")
    ap.add_argument("--keep-others", action="store_true",
                    help="rows of recipes this workspace has not run are kept from the table already in each file (written "
                         "by an earlier run of this script; say which runs are which in --conditions)")
    ap.add_argument("--write-tuned-only", action="store_true",
                    help="write only the defaults-vs-tuned table (BENCHMARKS.md); print the defaults table (a workspace that "
                         "holds fewer recipes than the README's table, or other conditions)")
    ap.add_argument("--tuned", metavar="BUDGET", default=None,
                    help="then tune each recipe for BUDGET (30s / 20m / 1h) and run its tuned recipe: the defaults-vs-tuned table")
    ap.add_argument("--tune-set", metavar="KEY=VALUE", action="append", default=[],
                    help="with --tuned: a recipe override for the search only, e.g. tune.holdout=0.15 (repeatable; shown in the table)")
    ap.add_argument("--skip-defaults", action="store_true", help="with --tuned: reuse the workspace's defaults runs, do not rerun them")
    ap.add_argument("--micro-only", action="store_true",
                    help="run the defaults without baselines (the micro-model alone: enough for the defaults-vs-tuned table)")
    ap.add_argument("--trial-fit", metavar="BUDGET", help="print how many trials of each recipe's own settings BUDGET holds "
                    "(from the workspace's defaults runs: training time + scoring the valid rows) and exit")
    args = ap.parse_args()
    if args.trial_fit:
        print(trial_fit(args.workspace, _seconds(args.trial_fit)))
        return
    budget = _seconds(args.tuned) if args.tuned else None
    if not args.table_only:
        for name in args.only or RECIPES:
            if not (args.skip_defaults and _latest_eval(args.workspace, name)):
                print(f"== {name}", flush=True)
                print(f"   {run_recipe(name, args.workspace, args.micro_only) / 60:.1f} min", flush=True)
            if budget:
                print(f"== {name}, tuned for {args.tuned}", flush=True)
                print(f"   {tune_recipe(name, args.workspace, budget, args.tune_set)}", flush=True)
    body = ("Produced by `.venv/bin/python benchmarks/recipe_results.py` (bundled defaults of each recipe, "
            "SmolLM2-135M-Instruct, 2 CPU cores; every baseline the recipe lists, classical (TF-IDF + logistic regression) "
            "for classify and lead (first sentence) for generate included; main metric with its 95 % bootstrap interval over the test rows; "
            "p: McNemar mid-p on per-row correctness where the main metric is accuracy, paired bootstrap of the main metric "
            "otherwise). "
            + (args.conditions + " " if args.conditions else "")
            + ("" if args.keep_others or all(_latest_eval(args.workspace, n) for n in RECIPES)
               else "Recipes not listed have not been run into this workspace yet.")
            + "\n\n" + table(args.workspace))
    for path in () if args.no_write or args.write_tuned_only else (ROOT / "README.md", ROOT / "BENCHMARKS.md"):
        write_block(path, merged(path, body) if args.keep_others else body)
    print(body)
    if args.tuned or (args.workspace / "tuned" / "tune-results.json").is_file():
        tuned = ("Produced by `.venv/bin/python benchmarks/recipe_results.py --tuned BUDGET`: each recipe tuned by `microtune tune` "
                 "(train and valid splits only; the recipe's default search space) within the budget, its tuned recipe trained "
                 "and scored on the same test split as its defaults run; interval: 95 % percentile bootstrap of the paired "
                 "difference over the test rows; p: McNemar mid-p where the main metric is accuracy, paired bootstrap otherwise. "
                 + (args.conditions + " " if args.conditions else "") + "\n\n" + tuned_table(args.workspace))
        if not args.no_write:
            write_block_named(ROOT / "BENCHMARKS.md", "recipe-tuned", tuned)
        print(tuned)


def _seconds(text: str) -> float:
    """``30s`` / ``20m`` / ``2h`` (or plain seconds) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise SystemExit(f"--tuned takes a duration such as 30s, 20m or 2h, got {text!r}") from None


if __name__ == "__main__":
    main()
