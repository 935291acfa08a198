"""Label scoring: the greedy trie walk vs full-sequence log-likelihood, on every classify micro-model of a workspace.

    .venv/bin/python benchmarks/label_scoring.py .microtune-results                 # every classify recipe trained there
    .venv/bin/python benchmarks/label_scoring.py .microtune-results --only banking-intents --repeats 5
    .venv/bin/python benchmarks/label_scoring.py /tmp/ws --no-write                  # print only, BENCHMARKS.md untouched

The workspace is the one `benchmarks/recipe_results.py` trains into: `<ws>/<recipe>/adapters/<run>/` (the newest
adapter of each recipe is taken), its dataset under `<ws>/<recipe>/datasets/`. For each classify adapter the test split
is predicted with both scorers (`task.scoring: trie` and `loglik`) by the same model, the same prompts (eval's micro
prompt) and the same batches (the recipe's `eval.batch_size`); the two runs alternate, `--repeats` times each, and the
wall time of each scorer is the median of its runs. Quality: the recipe's main metric and macro-F1 of each scorer,
the paired difference (loglik − trie) with its percentile-bootstrap interval from one shared index matrix
(`evaluation.stats.Bootstrap`, the recipe's `eval.n_resamples`, `eval.seed`, `eval.confidence`), and McNemar's mid-p
on per-row correctness. The section between the label-scoring markers in BENCHMARKS.md is replaced (unless
`--no-write`); the raw numbers go to `<ws>/label-scoring.json`.

Which scorer is the default is one line: `DEFAULT_SCORING` in `src/microtune/tasks/base.py`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from recipe_results import write_block_named  # noqa: E402  (benchmarks/ is the script's folder, so on sys.path)

SCORERS = ("trie", "loglik")
MARKER = "label-scoring"


def adapters(workspace: Path, only: list[str] | None) -> list[tuple[str, Path]]:
    """``(recipe name, newest complete adapter folder)`` of every recipe folder in the workspace."""
    out = []
    for folder in sorted(p for p in workspace.iterdir() if (p / "adapters").is_dir()):
        if only and folder.name not in only:
            continue
        done = sorted(p for p in (folder / "adapters").iterdir() if (p / "manifest.json").is_file() and (p / "recipe.json").is_file())
        if done:
            out.append((folder.name, done[-1]))
    return out


def dataset_of(adapter_dir: Path, manifest: dict[str, Any]) -> Path:
    """The adapter's dataset folder: as its manifest names it, else the folder of that name under the recipe's datasets/
    (a workspace copied or moved to another path)."""
    named = Path(manifest["dataset_dir"])
    if named.is_dir():
        return named
    moved = adapter_dir.parents[1] / "datasets" / named.name
    if moved.is_dir():
        return moved
    raise SystemExit(f"{adapter_dir}: its dataset {named} is neither there nor under {moved.parent}")


def measure(name: str, adapter_dir: Path, repeats: int, max_rows: int | None) -> dict[str, Any] | None:
    """Both scorers on one adapter's test split: predictions, metrics, the paired comparison and the wall times."""
    from microtune.config import artifact_recipe
    from microtune.core.artifacts import read_manifest
    from microtune.data import read_split
    from microtune.models import LabelPredictor, load_model, load_tokenizer, resolve_base
    from microtune.models.hardware import device, use_bf16
    from microtune.models.trained import load_trained
    from microtune.tasks import get_task
    from microtune.tasks.render import Renderer

    recipe = artifact_recipe(adapter_dir / "recipe.json")
    if recipe.task.type != "classify":
        return None
    manifest = read_manifest(adapter_dir, "adapter")
    test = read_split(dataset_of(adapter_dir, manifest), "test")[: max_rows or recipe.eval.max_examples]
    task = get_task(recipe.task, manifest["labels"])
    ref = resolve_base(recipe.model)
    renderer = Renderer(load_tokenizer(ref))
    model = load_trained(ref, adapter_dir, load_model(ref, recipe.model.trust_remote_code).to(device()))
    prompts = [renderer.encode(task.messages(ex), task.target(ex), recipe.train.max_seq_len)[0] for ex in test]
    candidates = task.decoder().candidates
    bf16 = use_bf16(recipe.train.bf16)
    predictors = {s: LabelPredictor(model, renderer, candidates, recipe.eval.batch_size, bf16, scoring=s) for s in SCORERS}
    preds: dict[str, list[str]] = {}
    seconds: dict[str, list[float]] = {s: [] for s in SCORERS}
    for _ in range(repeats):
        for scorer in SCORERS:  # alternated, so a change of machine load falls on both alike
            start = time.perf_counter()
            answers = predictors[scorer].predict(prompts)
            seconds[scorer].append(time.perf_counter() - start)
            preds.setdefault(scorer, [label for label, _ in answers])
    golds = [task.gold(ex) for ex in test]
    return {"recipe": name, "adapter": str(adapter_dir), "rows": len(test), "answers": len(candidates),
            "main_metric": recipe.metric_names()[0], "repeats": repeats, "batch_size": recipe.eval.batch_size,
            "seconds": {s: seconds[s] for s in SCORERS}, "median_s": {s: statistics.median(seconds[s]) for s in SCORERS},
            **compare(recipe, task, golds, preds)}


def compare(recipe: Any, task: Any, golds: list[str], preds: dict[str, list[str]]) -> dict[str, Any]:
    """Each scorer's metrics, and per compared metric the paired difference loglik − trie with its bootstrap interval."""
    from microtune.evaluation import stats

    cfg = recipe.eval
    boot = stats.Bootstrap(len(golds), cfg.n_resamples, cfg.seed)
    metrics = {s: stats.scalar_metrics(task.metrics(golds, preds[s])) for s in SCORERS}
    dists = {s: boot.distribution(golds, preds[s], task.metrics) for s in SCORERS}
    names = list(dict.fromkeys([recipe.metric_names()[0], "macro_f1"]))
    paired = {}
    for m in names:
        delta = metrics["loglik"][m] - metrics["trie"][m]
        low, high = stats.percentile_ci(dists["loglik"][m] - dists["trie"][m], cfg.confidence)
        paired[m] = {"delta": delta, "low": low, "high": high,
                     "p_bootstrap": stats.paired_bootstrap_p(dists["loglik"][m], dists["trie"][m], delta)}
    mcnemar = stats.mcnemar([g == p for g, p in zip(golds, preds["loglik"])], [g == p for g, p in zip(golds, preds["trie"])])
    agree = sum(a == b for a, b in zip(preds["trie"], preds["loglik"])) / max(len(golds), 1)
    return {"metrics": metrics, "paired": paired, "mcnemar_mid_p": mcnemar["mid_p"], "agreement": agree,
            "confidence": cfg.confidence, "n_resamples": cfg.n_resamples}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| recipe | test rows | answers | metric | trie | loglik | loglik − trie [interval] | McNemar mid-p | same answer "
             "| trie s (median) | loglik s (median) | loglik / trie time |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for i, (metric, d) in enumerate(r["paired"].items()):
            head = (f"`{r['recipe']}` | {r['rows']} | {r['answers']}" if i == 0 else " | | ")
            times = (f"{r['median_s']['trie']:.2f} | {r['median_s']['loglik']:.2f} | "
                     f"{r['median_s']['loglik'] / max(r['median_s']['trie'], 1e-9):.1f}×") if i == 0 else " | | "
            p = (f"{r['mcnemar_mid_p']:.3f}" if i == 0 else "")
            same = f"{r['agreement']:.1%}" if i == 0 else ""
            lines.append(f"| {head} | {metric} | {r['metrics']['trie'][metric]:.3f} | {r['metrics']['loglik'][metric]:.3f} | "
                         f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {p} | {same} | {times} |")
    return "\n".join(lines)


def section(results: list[dict[str, Any]], command: str, conditions: str) -> str:
    from microtune.evaluation import timing

    hw = ", ".join(str(x) for x in timing.hardware())
    conf = results[0]["confidence"] if results else 0.95
    return (f"Produced by `{command}`: every classify micro-model of the workspace predicts its test split with both "
            f"scorers (same model, prompts and batches; runs alternated, wall time = median of {results[0]['repeats'] if results else 0}). "
            f"Interval: {conf:.0%} percentile bootstrap of the paired difference over test rows; McNemar mid-p on per-row "
            f"correctness. Hardware: {hw}. " + (conditions + " " if conditions else "") +
            "The default scorer is `DEFAULT_SCORING` in `src/microtune/tasks/base.py`.\n\n" + table(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path, help="the workspace the classify recipes were trained into")
    ap.add_argument("--only", nargs="*", help="only these recipe folders")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer (alternated); the median is reported")
    ap.add_argument("--max-rows", type=int, default=None, help="only the first N test rows [default: the recipe's eval.max_examples]")
    ap.add_argument("--conditions", default="", help="how the runs were made (threads, machine load), printed with the table")
    ap.add_argument("--no-write", action="store_true", help="print the section; leave BENCHMARKS.md and <ws>/label-scoring.json alone")
    args = ap.parse_args()
    if not args.workspace.is_dir():
        raise SystemExit(f"{args.workspace} is not a folder; give the workspace the recipes were trained into")
    results = []
    for name, adapter_dir in adapters(args.workspace, args.only):
        print(f"== {name} ({adapter_dir.name})", flush=True)
        result = measure(name, adapter_dir, args.repeats, args.max_rows)
        if result is None:
            print("   not a classify recipe: skipped", flush=True)
            continue
        results.append(result)
        print(table([result]), flush=True)
    if not results:
        raise SystemExit(f"no classify adapter under {args.workspace}/<recipe>/adapters/")
    command = ".venv/bin/python benchmarks/label_scoring.py " + " ".join(sys.argv[1:])
    body = section(results, command, args.conditions)
    if not args.no_write:
        (args.workspace / "label-scoring.json").write_text(json.dumps(results, indent=2) + "\n")
        write_block_named(ROOT / "BENCHMARKS.md", MARKER, body)
    print(body)


if __name__ == "__main__":
    main()
