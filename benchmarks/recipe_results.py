"""Run every bundled recipe end to end and write the README's results table (baselines vs micro-model).

    .venv/bin/python benchmarks/recipe_results.py                       # all recipes, fresh runs
    .venv/bin/python benchmarks/recipe_results.py --only phee-ade scitldr
    .venv/bin/python benchmarks/recipe_results.py --table-only          # rebuild the table from earlier runs

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


def run_recipe(name: str, workspace: Path) -> float:
    from rich.console import Console

    from microtune import pipeline
    from microtune.console import ConsoleReporter

    start = time.perf_counter()
    pipeline.run(ROOT / "recipes" / f"{name}.yaml", workspace=workspace, reporter=ConsoleReporter(Console(stderr=True), bars=False))
    seconds = time.perf_counter() - start
    times = _read_times(workspace)
    times[name] = round(seconds, 1)
    (workspace / "recipe-times.json").write_text(json.dumps(times, indent=2) + "\n")
    return seconds


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


def _p_text(metrics: dict[str, Any], system: str | None) -> str:
    p = metrics[system].get("p_value_vs_micro") if system else None
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
        task = json.loads((Path(manifest["adapter_dir"]) / "recipe.json").read_text())["task"]["type"]
        prompted = [s for s in PROMPTED if s in metrics]
        best = max(prompted, key=lambda s: metrics[s][main]) if prompted else None
        free = next((s for s in MODEL_FREE if s in metrics), None)
        seconds = times.get(name)
        cells = [_cell(metrics[s], main) if s in metrics else "—" for s in PROMPTED]
        cells += [f"{_cell(metrics[free], main)} ({free})" if free else "—", _cell(metrics["micro"], main)]
        lines.append(f"| `{name}` | {task} | {main} | " + " | ".join(cells) +
                     f" | {_p_text(metrics, best)} | {_p_text(metrics, free)} | {'—' if seconds is None else f'{seconds / 60:.1f} min'} |")
    return "\n".join(lines)


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
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave README.md and BENCHMARKS.md as they are")
    args = ap.parse_args()
    if not args.table_only:
        for name in args.only or RECIPES:
            print(f"== {name}", flush=True)
            print(f"   {run_recipe(name, args.workspace) / 60:.1f} min", flush=True)
    body = ("Produced by `.venv/bin/python benchmarks/recipe_results.py` (bundled defaults of each recipe, "
            "SmolLM2-135M-Instruct, 2 CPU cores; every baseline the recipe lists, classical (TF-IDF + logistic regression) "
            "for classify and lead (first sentence) for generate included; main metric with its 95 % bootstrap interval over the test rows; "
            "p: McNemar mid-p on per-row correctness for classification, paired bootstrap otherwise). "
            + (args.conditions + " " if args.conditions else "") + "Recipes not listed have not been run into this workspace yet."
            + "\n\n" + table(args.workspace))
    for path in () if args.no_write else (ROOT / "README.md", ROOT / "BENCHMARKS.md"):
        write_block(path, body)
    print(body)


if __name__ == "__main__":
    main()
