"""The watch scenario on real FAA maintenance narratives: a cause category the champion never saw arrives.

    .venv/bin/python benchmarks/watch_scenario.py            # ~15-25 min on 2 CPU cores

Steps (one workspace, one MLflow store, the bundled model):
  0. champion: the FAA recipe trained without the held-out cause ("operation with deficient equipment");
  1. batch 1 — 40 reports like the training data → below watch.min_new_rows: no retrain;
  2. batch 3 — malformed rows (missing cause, broken JSON) → quarantined with file:line, no retrain;
  3. batch 2 — reports of the held-out cause → trigger "new label" → QLoRA retrain on old + new rows →
     gate on the frozen set (recipe test + held-out new rows) → promote if it wins;
  4. a deliberately worse challenger (2 training steps) → the gate must reject it.
Writes the decisions and metrics into BENCHMARKS.md and the README's watch section (between markers).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes/data/faa-maintenance"
HELD_OUT = "operation with deficient equipment"


def _rows(split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def prepare(work: Path, base_rows: int) -> tuple[Path, dict[str, Path]]:
    rng = random.Random(7)
    train, test = _rows("train"), _rows("test")
    known = [r for r in train if r["cause"] != HELD_OUT]
    rng.shuffle(known)
    base, batch1 = known[:base_rows], known[base_rows:base_rows + 40]
    data = work / "data"
    _write(data / "train.jsonl", base)
    _write(data / "test.jsonl", [r for r in test if r["cause"] != HELD_OUT])
    inbox = work / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    batches = {
        "batch1": _write(work / "batches/batch1.jsonl", batch1),
        "batch3": work / "batches/batch3.jsonl",
        "batch2": _write(work / "batches/batch2.jsonl", [r for r in train + test if r["cause"] == HELD_OUT]),
    }
    batches["batch3"].write_text('{"text": "Engine cowling found loose after maintenance."}\n{"cause": "no text"}\nnot json at all\n')
    recipe = work / "faa-watch.yaml"
    recipe.write_text(f"""name: faa-watch
task:
  type: classify
  instruction: Name the primary cause of this aircraft maintenance incident report.
  label_field: cause
data:
  train: {data / 'train.jsonl'}
  test: {data / 'test.jsonl'}
  split: {{valid: 0.0}}
method: {{kind: lora, r: 16, alpha: 32, target_modules: all-linear}}
train: {{epochs: 2, lr: 5.0e-4, batch_size: 8, max_seq_len: 160, balance: auto}}
eval: {{baselines: [], metrics: [macro_f1, accuracy], latency_examples: 0}}
watch:
  inbox: {inbox}
  min_new_rows: 100
  new_label_min_rows: 10
  min_rows_for_tests: 30
  holdout: 0.3
""")
    return recipe, batches


def main() -> None:
    from microtune import pipeline
    from microtune.pipeline.watch import watch_once

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".microtune-results/watch-scenario")
    ap.add_argument("--base-rows", type=int, default=200)
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from the last run's steps.json")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((args.work / "steps.json").read_text())
        _publish(_markdown(saved["steps"], saved["minutes"], saved["base_rows"]))
        return
    shutil.rmtree(args.work, ignore_errors=True)
    recipe, batches = prepare(args.work, args.base_rows)
    ws = args.work / "ws"
    say = lambda msg: print(f"  watch: {msg}", flush=True)  # noqa: E731
    steps: list[dict[str, Any]] = []
    start = time.perf_counter()
    first = pipeline.run(recipe, workspace=ws, progress="lines")
    steps.append({"step": "0. champion (without the held-out cause)", "version": first.model_version,
                  "verdict": first.decision.verdict, "reason": first.decision.reason,
                  "macro_f1": first.metrics["micro"]["macro_f1"]})
    for name in ("batch1", "batch3", "batch2"):
        shutil.copy(batches[name], recipe.parent / "inbox" / f"{name}.jsonl")
        report = watch_once(recipe, workspace=ws, on_event=say)
        r = report.get("round") or {}
        steps.append({"step": name, "files": report["files"], "fired": report["fired"], "version": r.get("version"),
                      "verdict": r.get("verdict", "no retrain"), "reason": r.get("reason", ""),
                      "details": r.get("details", {}), "statistics": report["statistics"]})
    worse = pipeline.run(recipe, ["train.max_steps=2", "train.lr=1e-6"], workspace=ws, progress="lines")
    steps.append({"step": "worse challenger (2 steps at lr 1e-6)", "version": worse.model_version, "verdict": worse.decision.verdict,
                  "reason": worse.decision.reason, "details": worse.decision.details})
    minutes = (time.perf_counter() - start) / 60
    body = _markdown(steps, minutes, args.base_rows)
    saved = {"steps": steps, "minutes": minutes, "base_rows": args.base_rows}
    (args.work / "steps.json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
    _publish(body)


def _publish(body: str) -> None:
    from recipe_results import write_block_named

    for path in (ROOT / "README.md", ROOT / "BENCHMARKS.md"):
        write_block_named(path, "watch-scenario", body)
    print(body)


def _markdown(steps: list[dict[str, Any]], minutes: float, base_rows: int) -> str:
    lines = [f"`.venv/bin/python benchmarks/watch_scenario.py` — FAA maintenance narratives, champion trained on "
             f"{base_rows} reports without the cause \"{HELD_OUT}\"; {minutes:.0f} min on 2 CPU cores.", "",
             "| step | what arrived | triggers | version | decision |", "|---|---|---|---|---|"]
    for s in steps:
        arrived = "; ".join(f"{Path(f['file']).name}: {f['accepted']} accepted, {f['quarantined']} quarantined"
                            for f in s.get("files", [])) or "—"
        fired = "; ".join(s.get("fired", [])) or "—"
        d = s.get("details") or {}
        figures = (f" (champion {d['champion_value']:.3f} vs challenger {d['challenger_value']:.3f} {d['main_metric']} on "
                   f"{d['examples']} frozen rows, {d['test']} p={d['p_value']:.2g})") if "champion_value" in d else ""
        decision = s["verdict"] + (f": {s['reason']}" if s["reason"] else "") + figures
        lines.append(f"| {s['step']} | {arrived} | {fired} | {s.get('version') or '—'} | {decision} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
