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
    """FAA maintenance narratives → primary cause; the natural imbalance (≈70 % one cause) is kept on purpose. All 2,726
    unique reports of the six causes are used: 300 test, 100 valid, the rest (2,326) train."""
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
    # valid and test are the first cut's rows (results stay comparable); train took every other report later (issue 15)
    for split, part in [("train", unique[:700] + unique[1100:]), ("valid", unique[700:800]), ("test", unique[800:1100])]:
        with open(out / f"{split}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copy(src / "LICENSE", out / "LICENSE")


def _write(out: Path, split: str, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{split}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def clinc150_oos(shared: Path) -> None:
    """Banking intents plus CLINC150's out-of-scope requests (label `oos`): the micro-model must say 'none of these'."""
    src = shared / "clinc150"
    full = json.loads((src / "data_full.json").read_text())
    labels = set(json.loads((src / "domains.json").read_text())["banking"])
    rng = random.Random(151)
    out = ROOT / "recipes/data/clinc150-oos"
    for split, key, per_label, n_oos in [("train", "train", 16, 60), ("valid", "val", 2, 10), ("test", "test", 10, 60)]:
        rows = _take(full[key], labels, per_label, rng)
        oos = sorted(t for t, _ in full[f"oos_{key}"])
        rng.shuffle(oos)
        rows += [{"text": t, "intent": "oos"} for t in oos[:n_oos]]
        rng.shuffle(rows)
        _write(out, split, rows)
    shutil.copy(src / "LICENSE", out / "LICENSE")


CUAD_CATEGORIES = ["Anti-Assignment", "Audit Rights", "Cap On Liability", "Exclusivity", "Governing Law",
                   "Insurance", "License Grant", "Termination For Convenience"]


def cuad_clauses(shared: Path) -> None:
    """CUAD clause → category, 8 categories; contracts are split between train and test (no contract in both)."""
    src = shared / "cuad"
    rows = [json.loads(line) for line in (src / "clauses_by_category.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["category"] in CUAD_CATEGORIES and 40 <= len(r["clause"]) <= 600]
    contracts = sorted({r["contract"] for r in rows})
    rng = random.Random(510)
    rng.shuffle(contracts)
    held = set(contracts[: len(contracts) // 4])
    out = ROOT / "recipes/data/cuad-clauses"
    taken: set[str] = set()  # boilerplate recurs across contracts: a test clause never repeats a train one
    for split, pool, per_label in [("train", [r for r in rows if r["contract"] not in held], 40),
                                   ("test", [r for r in rows if r["contract"] in held], 20)]:
        picked = []
        for cat in CUAD_CATEGORIES:
            group = sorted((r for r in pool if r["category"] == cat), key=lambda r: (r["contract"], r["clause"]))
            rng.shuffle(group)
            seen: set[str] = set()
            for r in group:
                key = " ".join(r["clause"].lower().split())
                if key not in seen and key not in taken and len(seen) < per_label:
                    seen.add(key)
                    picked.append({"text": r["clause"], "category": cat, "contract": r["contract"]})
            taken |= seen
        rng.shuffle(picked)
        _write(out, split, picked)
    shutil.copy(src / "CUAD_v1_README.txt", out / "CUAD_v1_README.txt")


PHEE_FIELDS = {"drug": ("Treatment", "Drug"), "effect": ("Effect", None), "dosage": ("Treatment", "Dosage"),
               "route": ("Treatment", "Route")}


def _phee_output(row: dict) -> dict:
    out: dict[str, list[str]] = {f: [] for f in PHEE_FIELDS}
    for ann in row["annotations"]:
        for event in ann["events"]:
            for field, (arg, sub) in PHEE_FIELDS.items():
                node = event.get(arg, {})
                node = node.get(sub, {}) if sub else node
                for spans in node.get("text", []):
                    for span in spans:
                        if span not in out[field]:
                            out[field].append(span)
    return {f: (v[0] if len(v) == 1 else v) if v else None for f, v in out.items()}


def phee_extract(shared: Path) -> None:
    """PHEE adverse-drug-event sentences → JSON {drug, effect, dosage, route} (spans copied from the text)."""
    src = shared / "phee"
    out = ROOT / "recipes/data/phee-ade"
    rng = random.Random(2898)
    for split, name, n in [("train", "train", 400), ("valid", "dev", 40), ("test", "test", 150)]:
        rows = [json.loads(line) for line in (src / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        rows = sorted(rows, key=lambda r: r["id"])
        rng.shuffle(rows)
        _write(out, split, [{"id": r["id"], "text": r["context"], "target": _phee_output(r)} for r in rows[:n]])
    shutil.copy(src / "LICENSE", out / "LICENSE")


def scitldr_summaries(shared: Path) -> None:
    """SciTLDR-A: abstract → one-sentence summary; test rows keep every reference summary."""
    src = shared / "scitldr"
    out = ROOT / "recipes/data/scitldr"
    rng = random.Random(1992)
    for split, name, n in [("train", "train", 300), ("valid", "dev", 30), ("test", "test", 100)]:
        rows = [json.loads(line) for line in (src / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if len(" ".join(r["source"]).split()) <= 260 and r["target"]]
        rng.shuffle(rows)
        picked = [{"paper_id": r.get("paper_id"), "text": " ".join(r["source"]),
                   "target": r["target"] if split == "test" else r["target"][0]} for r in rows[:n]]
        _write(out, split, picked)
    shutil.copy(src / "LICENSE", out / "LICENSE")


if __name__ == "__main__":
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT.parent / "shared/datasets")
    clinc150_banking(shared)
    faa_maintenance(shared)
    clinc150_oos(shared)
    cuad_clauses(shared)
    phee_extract(shared)
    scitldr_summaries(shared)
