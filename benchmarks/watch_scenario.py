"""The watch scenario on real data: categories the champion never saw arrive through the inbox.

    .venv/bin/python benchmarks/watch_scenario.py --scenario banking   # CLINC150 banking, 2 new intents; ~20 min on 2 cores
    .venv/bin/python benchmarks/watch_scenario.py --scenario faa       # FAA maintenance, 1 new cause;    ~15-25 min

Steps (one workspace, one MLflow store, the bundled model):
  0. champion: the recipe trained without the held-out categories;
  1. batch 1 — 40 rows like the training data → below watch.min_new_rows: no retrain;
  2. batch 3 — malformed rows (missing label, broken JSON) → quarantined with file:line, no retrain;
  3. batch 2 — rows of the held-out categories → trigger "new label" → QLoRA retrain on old + new rows →
     gate on the frozen set (recipe test + held-out new rows) → promote if it wins;
  4. a deliberately worse challenger (2 training steps at lr 1e-6) → the gate must reject it.
Writes the decisions and metrics into BENCHMARKS.md and docs/watch.md (block watch-scenario-<name>).
The held-out categories were fixed before any run: for banking, one easy to tell apart ("order_checks") and one
close to three others ("report_lost_card" vs damaged_card, new_card, freeze_account).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str             # the data, in words
    data: str             # folder under recipes/data
    field: str            # the label field of the rows
    held_out: tuple[str, ...]
    recipe: str           # the recipe body after name/data (task, method, train, eval)
    metrics: str          # main metric first
    base_rows: int | None  # rows of known categories the champion trains on (None: all but batch 1's 40)
    holdout: float        # watch.holdout: share of new rows kept for the frozen set


SCENARIOS = {
    "banking": Scenario(
        "banking", "CLINC150 banking requests (30 intents)", "clinc150-banking", "intent", ("order_checks", "report_lost_card"),
        """task:
  type: classify
  instruction: Name the intent of this bank customer's message.
  label_field: intent
method: {kind: lora, r: 16, alpha: 32, target_modules: all-linear}
train: {epochs: 3, lr: 5.0e-4, batch_size: 8, max_seq_len: 128}
""", "[accuracy, macro_f1]", None, 0.4),
    "faa": Scenario(
        "faa", "FAA maintenance narratives", "faa-maintenance", "cause", ("operation with deficient equipment",),
        """task:
  type: classify
  instruction: Name the primary cause of this aircraft maintenance incident report.
  label_field: cause
method: {kind: lora, r: 16, alpha: 32, target_modules: all-linear}
train: {epochs: 2, lr: 5.0e-4, batch_size: 8, max_seq_len: 160, balance: auto}
""", "[macro_f1, accuracy]", 200, 0.3),
}


def _rows(sc: Scenario, split: str) -> list[dict[str, Any]]:
    path = ROOT / "recipes/data" / sc.data / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def prepare(sc: Scenario, work: Path) -> tuple[Path, dict[str, Path]]:
    rng = random.Random(7)
    train, valid, test = _rows(sc, "train"), _rows(sc, "valid"), _rows(sc, "test")
    known = [r for r in train if r[sc.field] not in sc.held_out]
    rng.shuffle(known)
    base_rows = len(known) - 40 if sc.base_rows is None else sc.base_rows
    base, batch1 = known[:base_rows], known[base_rows:base_rows + 40]
    data = work / "data"
    _write(data / "train.jsonl", base)
    _write(data / "test.jsonl", [r for r in test if r[sc.field] not in sc.held_out])
    inbox = work / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    batches = {
        "batch1": _write(work / "batches/batch1.jsonl", batch1),
        "batch3": work / "batches/batch3.jsonl",
        "batch2": _write(work / "batches/batch2.jsonl", [r for r in train + valid + test if r[sc.field] in sc.held_out]),
    }
    batches["batch3"].write_text(f'{{"text": "a row without its label"}}\n{{"{sc.field}": "no text"}}\nnot json at all\n')
    recipe = work / f"{sc.name}-watch.yaml"
    recipe.write_text(f"""name: {sc.name}-watch
{sc.recipe}data:
  train: {data / 'train.jsonl'}
  test: {data / 'test.jsonl'}
  split: {{valid: 0.0}}
eval: {{baselines: [], metrics: {sc.metrics}, latency_examples: 0}}
watch:
  inbox: {inbox}
  min_new_rows: 100
  new_label_min_rows: 10
  min_rows_for_tests: 30
  holdout: {sc.holdout}
""")
    return recipe, batches


def main() -> None:
    from rich.console import Console

    from microtune import pipeline
    from microtune.console import ConsoleReporter
    from microtune.pipeline.watch import watch_once

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="banking")
    ap.add_argument("--work", type=Path, default=None, help="default: .microtune-results/watch-<scenario>")
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from the last run's steps.json")
    args = ap.parse_args()
    sc = SCENARIOS[args.scenario]
    work = args.work or ROOT / f".microtune-results/watch-{sc.name}"
    if args.report_only:
        saved = json.loads((work / "steps.json").read_text())
        _publish(sc, _markdown(sc, saved))
        return
    shutil.rmtree(work, ignore_errors=True)
    recipe, batches = prepare(sc, work)
    ws = work / "ws"
    lines = ConsoleReporter(Console(stderr=True), bars=False)
    say = lambda e: print(f"  watch: {e.data['text']}", flush=True) if e.stage == "watch" and e.kind == "message" else None  # noqa: E731
    steps: list[dict[str, Any]] = []
    start = time.perf_counter()
    first = pipeline.run(recipe, workspace=ws, reporter=lines)
    steps.append({"step": "0. champion (without the held-out categories)", "version": first.model_version,
                  "verdict": first.decision.verdict, "reason": first.decision.reason, "metrics": first.metrics["micro"]})
    for name in ("batch1", "batch3", "batch2"):
        shutil.copy(batches[name], recipe.parent / "inbox" / f"{name}.jsonl")
        report = watch_once(recipe, workspace=ws, reporter=say)
        r = report.get("round") or {}
        steps.append({"step": name, "files": report["files"], "fired": report["fired"], "version": r.get("version"),
                      "verdict": r.get("verdict", "no retrain"), "reason": r.get("reason", ""),
                      "details": r.get("details", {}), "statistics": report["statistics"],
                      "new_labels": _new_label_recall(sc, ws, recipe, r.get("version")) if r else {}})
    worse = pipeline.run(recipe, ["train.max_steps=2", "train.lr=1e-6"], workspace=ws, reporter=lines)
    steps.append({"step": "worse challenger (2 steps at lr 1e-6)", "version": worse.model_version, "verdict": worse.decision.verdict,
                  "reason": worse.decision.reason, "details": worse.decision.details})
    saved = {"steps": steps, "minutes": (time.perf_counter() - start) / 60, "rows": {k: _count(p) for k, p in batches.items()},
             "champion_rows": _count(work / "data/train.jsonl")}
    (work / "steps.json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
    _publish(sc, _markdown(sc, saved))


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _new_label_recall(sc: Scenario, ws: Path, recipe: Path, version: str | None) -> dict[str, Any]:
    """Per held-out category: recall on the frozen set of the round's version and of the champion it faced."""
    from microtune.core.artifacts import read_json

    path = ws / f"{sc.name}-watch/decisions/v{version}.json"
    if version is None or not path.exists():
        return {}
    recall = read_json(path)["details"].get("recall", {})
    return {label: {who: recall.get(who, {}).get(label) for who in ("champion", "challenger")} for label in sc.held_out}


def _publish(sc: Scenario, body: str) -> None:
    from recipe_results import write_block_named

    for path in (ROOT / "docs" / "watch.md", ROOT / "BENCHMARKS.md"):
        write_block_named(path, f"watch-scenario-{sc.name}", body)
    print(body)


def _markdown(sc: Scenario, saved: dict[str, Any]) -> str:
    held = ", ".join(f'"{label}"' for label in sc.held_out)
    rows = saved["rows"]
    lines = [f"`.venv/bin/python benchmarks/watch_scenario.py --scenario {sc.name}` — {sc.what}; the champion trained on "
             f"{saved['champion_rows']} rows without {held}; batch 2 brings {rows['batch2']} rows of "
             f"{'it' if len(sc.held_out) == 1 else 'them'} (a share `watch.holdout` = {sc.holdout} goes to the frozen set); "
             f"{saved['minutes']:.0f} min on 2 CPU cores.", "",
             "| step | what arrived | triggers | version | decision |", "|---|---|---|---|---|"]
    learned = []
    for s in saved["steps"]:
        arrived = "; ".join(f"{Path(f['file']).name}: {f['accepted']} accepted, {f['quarantined']} quarantined"
                            for f in s.get("files", [])) or "—"
        fired = "; ".join(s.get("fired", [])) or "—"
        d = s.get("details") or {}
        figures = (f" (champion {d['champion_value']:.3f} vs challenger {d['challenger_value']:.3f} {d['main_metric']} on "
                   f"{d['examples']} frozen rows, {d['test']} p={d['p_value']:.2g})") if "champion_value" in d else ""
        decision = s["verdict"] + (f": {s['reason']}" if s["reason"] else "") + figures
        lines.append(f"| {s['step']} | {arrived} | {fired} | {s.get('version') or '—'} | {decision} |")
        for label, r in (s.get("new_labels") or {}).items():
            if r.get("challenger") is not None:
                learned.append(f"\"{label}\" recall on the frozen set: champion {r['champion'] or 0:.2f}, version {s['version']} "
                               f"{r['challenger']:.2f}")
        noise = d.get("recall_drops_within_noise") or []
        if noise:
            learned.append(f"version {s['version']}: recall drops over `gate.recall_drop` within noise (not rejected): " + ", ".join(
                f"{n['label']} −{n['drop']:.2f} ({n['lost']} lost / {n['gained']} gained, p={n['p_value']:.2g})" for n in noise))
    return "\n".join(lines + ([""] + [f"- {line}" for line in learned] if learned else []))


if __name__ == "__main__":
    main()
