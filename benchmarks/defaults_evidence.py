"""The tuning runs behind `auto` epochs, learning rate and batch size (src/microtune/training/defaults.py).

    .venv/bin/python benchmarks/defaults_evidence.py grid  --out /tmp/defaults   # the grids below: ~45 min on 2 CPU cores
    .venv/bin/python benchmarks/defaults_evidence.py grid  --only clinc-epochs --out /tmp/defaults
    .venv/bin/python benchmarks/defaults_evidence.py curves --workspace /work/results-ws   # validation curves of recipe runs
    .venv/bin/python benchmarks/defaults_evidence.py table --out /tmp/defaults            # write BENCHMARKS.md

`grid`: each cell trains a bundled recipe with some overrides on its **train** split and scores the adapter on its
**valid** split (as `microtune tune` scores a trial; the test split is read only by the `test` cells that compare the rule
with the old fixed defaults), recording the valid metric, the lowest validation loss and the step it was reached at,
and the training time. `curves`: the validation loss at each epoch of the adapters a recipe_results workspace holds
(every bundled recipe trained with the fixed 3-epoch default), to see where it stops improving. `table`: the figures
as a section of BENCHMARKS.md. Each cell's result is cached in ``--out`` (a rerun skips finished cells).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "BENCHMARKS.md"
START, END = "<!-- defaults-evidence:start -->", "<!-- defaults-evidence:end -->"
FIXED = ["train.epochs=3", "train.lr=0.0005", "train.batch_size=8"]  # the fixed defaults before `auto`

# name → (recipe, rows per label or None for the whole train split, [(cell label, overrides)], also score test)
GRIDS: dict[str, tuple[str, int | None, list[tuple[str, list[str]]], bool]] = {
    "clinc-epochs": ("clinc150-oos", None, [(f"epochs {e}", [f"train.epochs={e}", "train.lr=0.0005", "train.batch_size=8"])
                                           for e in (2, 3, 5, 8)], True),
    "banking-epochs": ("banking-intents", None, [(f"epochs {e}", [f"train.epochs={e}", "train.lr=0.0005", "train.batch_size=8"])
                                                 for e in (3, 4, 6)], False),
    "banking150-lr": ("banking-intents", 5, [(f"{k} lr {lr}", ([] if k == "lora" else [f"method={{kind: {k}}}"])
                                              + [f"train.lr={lr}", "train.epochs=auto", "train.batch_size=auto"])
                                             for k, lrs in (("lora", (1e-4, 5e-4, 2e-3)), ("ia3", (1e-3, 5e-3, 2e-2)),
                                                            ("prompt_tuning", (1e-2, 3e-2, 1e-1)))
                                             for lr in lrs], False),
}


def _recipe_path(name: str) -> Path:
    return ROOT / "recipes" / f"{name}.yaml"


def _subset(recipe: str, per_label: int, folder: Path) -> Path:
    """The first ``per_label`` train rows of each label of a classify recipe (its train file), as a JSONL file."""
    from microtune.config import load_recipe
    from microtune.data import build_dataset

    loaded = load_recipe(_recipe_path(recipe))
    data = build_dataset(loaded)
    text_key, label_key = loaded.task.text_field, loaded.task.label_field  # the file's own field names
    taken: dict[str, int] = {}
    rows = []
    for row in data.splits["train"]:
        if taken.get(row["label"], 0) < per_label:
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            rows.append({text_key: row["text"], label_key: row["label"]})
    path = folder / f"{recipe}-{per_label}-per-label.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cell(recipe_name: str, overrides: list[str], test: bool, work: Path) -> dict[str, Any]:
    from microtune.core.artifacts import write_artifact
    from microtune.core.atomic import write_text
    from microtune.data import read_split
    from microtune.evaluation import score_examples
    from microtune.models import resolve_base
    from microtune.pipeline import check
    from microtune.pipeline.recipes import recipe_json
    from microtune.training import train_adapter

    checked = check(_recipe_path(recipe_name), overrides, work / "ws")
    recipe = checked.recipe
    ref = resolve_base(recipe.model)
    adapter = work / "adapter"
    start = time.perf_counter()
    with write_artifact(adapter, "adapter", {"recipe": recipe.name, "labels": checked.manifest["labels"]}) as (tmp, manifest):
        out = train_adapter(recipe, ref, checked.dataset_dir, checked.manifest["labels"], tmp)
        write_text(tmp / "recipe.json", recipe_json(recipe))
        manifest.update(method=out["method"], final=out["final"])
    train_s = time.perf_counter() - start
    valid = out["valid_history"]
    best = min(valid, key=lambda v: v["valid_loss"]) if valid else None
    cell = {"recipe": recipe_name, "overrides": overrides, "train_rows": checked.manifest["stats"]["rows"]["train"],
            "chosen": {k: c.value for k, c in checked.chosen.items()},
            "settings": {"epochs": recipe.train.epochs, "lr": recipe.train.lr, "batch_size": recipe.train.batch_size},
            "steps": out["history"][-1]["step"] if out["history"] else 0, "train_s": round(train_s, 1),
            "valid_losses": [(v["step"], round(v["valid_loss"], 4)) for v in valid],
            "best_valid_step": best["step"] if best else None, "best_valid_loss": round(best["valid_loss"], 4) if best else None,
            "valid": _numbers(score_examples(recipe, ref, adapter, read_split(checked.dataset_dir, "valid")))}
    if test:
        cell["test"] = _numbers(score_examples(recipe, ref, adapter, read_split(checked.dataset_dir, "test")))
    return cell


def _numbers(scores: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items() if isinstance(v, (int, float))}


def grid(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (recipe, per_label, cells, test) in GRIDS.items():
        if args.only and name not in args.only:
            continue
        base: list[str] = []
        if per_label:
            base = [f"data.train={_subset(recipe, per_label, out)}"]
        extra = [("rule (auto)", ["train.epochs=auto", "train.lr=auto", "train.batch_size=auto"])] if test else []
        for label, overrides in [*cells, *extra]:
            path = out / f"{name}--{label.replace(' ', '_')}.json"
            if path.is_file():
                continue
            with tempfile.TemporaryDirectory(prefix="defaults-") as tmp:
                cell = run_cell(recipe, base + overrides, test, Path(tmp))
            cell |= {"grid": name, "cell": label, "load": round(os.getloadavg()[0], 1)}
            path.write_text(json.dumps(cell, indent=1))
            print(name, label, cell["settings"], cell["steps"], "steps", cell["train_s"], "s", "valid", cell["valid"],
                  "best valid loss", cell["best_valid_loss"], "@", cell["best_valid_step"], cell.get("test", ""), flush=True)


def curves(args: argparse.Namespace) -> dict[str, Any]:
    """The validation loss at each epoch of each recipe's newest adapter in a recipe_results workspace."""
    found = {}
    for manifest_path in sorted(Path(args.workspace).glob("*/adapters/*/manifest.json")):
        m = json.loads(manifest_path.read_text())
        recipe = json.loads((manifest_path.parent / "recipe.json").read_text())
        found[manifest_path.parts[-4]] = {"epochs": recipe["train"]["epochs"], "batch_size": recipe["train"]["batch_size"],
                                           "valid_losses": [(v["step"], round(v["valid_loss"], 4)) for v in m["valid_history"]]}
    (Path(args.out) / "curves.json").write_text(json.dumps(found, indent=1))
    for name, c in found.items():
        print(name, c)
    return found


def table(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("*--*.json"))]
    curve = json.loads((out / "curves.json").read_text()) if (out / "curves.json").is_file() else {}
    lines = [START, "## Defaults from the data: the tuning runs behind `auto`", "",
             "`.venv/bin/python benchmarks/defaults_evidence.py grid --out /tmp/defaults` (then `curves --workspace <recipe_results "
             "workspace>` and `table`). Each cell trains on the recipe's train split and is scored on its valid split, as a "
             "`microtune tune` trial is; `train.keep_best` keeps the weights of the lowest validation loss (one validation a "
             "pass). The rule these figures gave: src/microtune/training/defaults.py, docs/training.md.", ""]
    if curve:
        lines += ["Validation loss at each pass of the bundled recipes' results runs (fixed 3 passes, batch 8):", "",
                  "| recipe | steps a pass | validation loss by step | lowest at |", "|---|---:|---|---:|"]
        for name, c in curve.items():
            vl = c["valid_losses"]
            per = vl[0][0] if vl else 0
            low = min(vl, key=lambda x: x[1])[0] if vl else "—"
            lines.append(f"| {name} | {per} | {', '.join(f'{s}: {v}' for s, v in vl)} | {low} |")
        lines.append("")
    for name in dict.fromkeys(c["grid"] for c in cells):
        rows = [c for c in cells if c["grid"] == name]
        test = any("test" in c for c in rows)
        metric = next(iter(rows[0]["valid"]))
        lines += [f"**{name}** ({rows[0]['recipe']}, {rows[0]['train_rows']} train rows):", "",
                  f"| cell | epochs | lr | batch | steps | valid {metric} | lowest valid loss (step) | train s |"
                  + (f" test {metric} |" if test else ""),
                  "|---|---:|---:|---:|---:|---:|---|---:|" + ("---:|" if test else "")]
        for c in rows:
            s = c["settings"]
            lines.append(f"| {c['cell']} | {s['epochs']} | {s['lr']:g} | {s['batch_size']} | {c['steps']} | {c['valid'][metric]:.3f} | "
                         f"{c['best_valid_loss']} ({c['best_valid_step']}) | {c['train_s']:.0f} |"
                         + (f" {c['test'][metric]:.3f} |" if test else ""))
        loads = [c["load"] for c in rows]
        lines += ["", f"1-minute load average after each cell: {min(loads)}–{max(loads)} on 2 CPUs.", ""]
    lines.append(END)
    text = BENCH.read_text()
    block = "\n".join(lines)
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH.write_text(text)
    print(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["grid", "curves", "table"])
    ap.add_argument("--out", default="/tmp/defaults", help="folder of the cells' results (cached: a rerun skips finished cells)")
    ap.add_argument("--only", nargs="*", choices=list(GRIDS), help="these grids only")
    ap.add_argument("--workspace", help="curves: a workspace of benchmarks/recipe_results.py")
    args = ap.parse_args()
    {"grid": grid, "curves": curves, "table": table}[args.mode](args)


if __name__ == "__main__":
    main()
