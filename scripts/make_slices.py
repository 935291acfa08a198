"""Cut the bundled data slices from the shared public datasets (a developer tool, not run by microtune).

    python scripts/make_slices.py ../shared/datasets

Each slice is written under recipes/data/<slice>/ with the licence and an attribution README, so the
recipes never read ../shared at run time. Seeds are fixed: rerunning reproduces the files byte for byte.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _take(rows: list[list[str]], labels: set[str], per_label: int, rng: random.Random) -> list[dict]:
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in rows:
        if label in labels:
            by_label[label].append(text)
    out = []
    for label in sorted(by_label):
        texts = sorted(by_label[label])
        rng.shuffle(texts)
        out += [{"text": t, "intent": label} for t in texts[:per_label]]
    rng.shuffle(out)
    return out


def clinc150_banking(shared: Path) -> None:
    src = shared / "clinc150"
    full = json.loads((src / "data_full.json").read_text())
    domains = json.loads((src / "domains.json").read_text())
    labels = set(domains["banking"]) | set(domains["credit_cards"])
    rng = random.Random(150)
    out = ROOT / "recipes/data/clinc150-banking"
    out.mkdir(parents=True, exist_ok=True)
    for split, key, per_label in [("train", "train", 20), ("valid", "val", 3), ("test", "test", 10)]:
        rows = _take(full[key], labels, per_label, rng)
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copy(src / "LICENSE", out / "LICENSE")


FAA_CAUSES = {  # primary cause codes of the FAA AID records (source README), in plain words
    "II": "inadequate preflight inspection",
    "ME": "failure or misuse of miscellaneous equipment",
    "AU": "operation with deficient equipment",
    "AF": "improper maintenance of airport facilities",
    "DE": "deficient company-maintained equipment",
    "EQ": "improper operation of emergency equipment",
}


def faa_maintenance(shared: Path) -> None:
    """FAA maintenance narratives → primary cause; the natural imbalance (≈70 % one cause) is kept on purpose."""
    src = shared / "faa_maintenance"
    rows = [json.loads(line) for line in (src / "faa_maintenance_labeled.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["primary_cause_code"] in FAA_CAUSES]
    seen, unique = set(), []
    for r in sorted(rows, key=lambda r: r["id"]):
        key = " ".join(r["text"].lower().split())
        if key not in seen:
            seen.add(key)
            unique.append({"id": r["id"], "text": r["text"], "cause": FAA_CAUSES[r["primary_cause_code"]]})
    rng = random.Random(2748)
    rng.shuffle(unique)
    out = ROOT / "recipes/data/faa-maintenance"
    out.mkdir(parents=True, exist_ok=True)
    for split, part in [("train", unique[:700]), ("valid", unique[700:800]), ("test", unique[800:1100])]:
        with open(out / f"{split}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copy(src / "LICENSE", out / "LICENSE")


if __name__ == "__main__":
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT.parent / "shared/datasets")
    clinc150_banking(shared)
    faa_maintenance(shared)
