"""ROUGE before and after the switch to rouge-score, on the same stored predictions (no model, no re-generation).

    PYTHONPATH=src .venv/bin/python benchmarks/rouge_rescore.py EVAL_DIR [--systems zero_shot lead] [--section rouge-rescore]

EVAL_DIR is a generate eval artifact (``.microtune/<recipe>/evals/<run>``): its ``predictions.jsonl`` holds every
system's answer and the references (``gold``). For each system the script prints, over the same rows:

- the former hand-written ROUGE-L F1 (lower-cased ``\\w+`` words, no stemming; kept below verbatim as the reference);
- ROUGE-L, ROUGE-1 and ROUGE-2 F1 as microtune now scores them (``tasks.generate.best_rouge``: Google's rouge-score,
  Porter stemming, best reference per row and per type), ROUGE-L with its 95 % percentile bootstrap interval
  (1000 resamples, seed 13, the eval's defaults).

``--section NAME`` also writes the table between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from microtune.core.jsonl import read_jsonl
from microtune.evaluation.stats import Bootstrap, percentile_ci
from microtune.tasks.generate import best_rouge

ROOT = Path(__file__).resolve().parents[1]


def old_rouge_l(prediction: str, reference: str) -> float:
    """microtune's ROUGE-L before rouge-score: F1 of the longest common subsequence of lower-cased ``\\w+`` words."""
    a, b = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not a or not b:
        return 0.0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def rescore(rows: list[dict], system: str, boot: Bootstrap) -> dict[str, float]:
    """Mean old ROUGE-L and new ROUGE-L/1/2 of one system over the rows, and the new ROUGE-L's interval."""
    refs = [r["gold"] if isinstance(r["gold"], list) else [r["gold"]] for r in rows]
    preds = [r[system]["pred"] or "" for r in rows]
    old = np.array([max(old_rouge_l(p, g) for g in gs) for p, gs in zip(preds, refs)])
    new = np.array([best_rouge(p, gs) for p, gs in zip(preds, refs)])
    low, high = percentile_ci(new[:, 2][boot.indices].mean(axis=1))
    return {"old_l": old.mean(), "l": new[:, 2].mean(), "l_low": low, "l_high": high, "r1": new[:, 0].mean(), "r2": new[:, 1].mean()}


def table(eval_dir: Path, only: list[str] | None = None) -> str:
    rows = read_jsonl(eval_dir / "predictions.jsonl")
    systems = [k for k in rows[0] if isinstance(rows[0][k], dict) and "pred" in rows[0][k] and (not only or k in only)]
    boot = Bootstrap(n_examples=len(rows), n_resamples=1000, seed=13)
    lines = ["| system | rows | ROUGE-L before (hand-written, unstemmed) | ROUGE-L now (rouge-score, stemmed) | ROUGE-1 now | ROUGE-2 now |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in systems:
        r = rescore(rows, s, boot)
        lines.append(f"| {s} | {len(rows)} | {r['old_l']:.3f} | {r['l']:.3f} [{r['l_low']:.3f}, {r['l_high']:.3f}] | {r['r1']:.3f} | {r['r2']:.3f} |")
    return "\n".join(lines)


def write_section(key: str, body: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace the block between ``<!-- key:start -->`` and ``<!-- key:end -->`` (appended when missing)."""
    text, start, end = path.read_text(), f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = text[: text.index(start)] + block + text[text.index(end) + len(end):] if start in text else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a generate eval folder (holds predictions.jsonl)")
    ap.add_argument("--systems", nargs="*", help="only these systems (default: every system in the predictions)")
    ap.add_argument("--section", help="also write the table into BENCHMARKS.md between this marker's start/end comments")
    args = ap.parse_args()
    if not (args.eval_dir / "predictions.jsonl").is_file():
        raise SystemExit(f"{args.eval_dir} has no predictions.jsonl: pass a generate eval folder (.microtune/<recipe>/evals/<run>)")
    shown = " ".join(["benchmarks/rouge_rescore.py", str(args.eval_dir)] + (["--systems", *args.systems] if args.systems else []))
    body = f"`PYTHONPATH=src .venv/bin/python {shown}`\n\n{table(args.eval_dir, args.systems)}"
    print(body)
    if args.section:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
