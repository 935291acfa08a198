"""Fidelity tests on real data (the CLINC150 banking slice): a crafted separable set must be flagged,
a non-separable one (real rows posing as synthetic) must pass, and the most synthetic-looking rows rank first."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from microtune.config import FidelityConfig
from microtune.synthesis.fidelity import fidelity, two_sample, write_html

CLINC = Path(__file__).resolve().parents[2] / "recipes" / "data" / "clinc150-banking" / "train.jsonl"


def styled(text: str) -> str:
    """What a chatty generator does to a customer message."""
    return f"Dear support team, {text}. Thank you kindly for your prompt assistance!"


@pytest.fixture(scope="module")
def clinc() -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in CLINC.read_text().splitlines()]
    rows = [{"text": r["text"], "label": r["intent"], "source": f"clinc:{i}"} for i, r in enumerate(rows)]
    random.Random(0).shuffle(rows)
    return rows


def test_real_rows_posing_as_synthetic_pass_the_gate(clinc: list[dict[str, Any]]) -> None:
    holdout, pool, synthetic = clinc[:150], clinc[150:300], clinc[300:450]
    planned = {label: 5 for label in {r["label"] for r in synthetic}}
    report, p_synth = fidelity(holdout, pool, synthetic, planned, FidelityConfig(), seed=13)
    assert report["two_sample"]["auc"] < 0.65 and report["passed"]
    assert len(p_synth) == 150
    probes = report["probes"]
    assert abs(probes["train_synthetic"]["macro_f1"] - probes["train_real"]["macro_f1"]) < 0.15
    assert report["distribution"]["length_ks"]["p_value"] > 0.01


def test_a_separable_synthetic_set_is_flagged(clinc: list[dict[str, Any]], tmp_path: Path) -> None:
    holdout, pool = clinc[:150], clinc[150:300]
    synthetic = [{**r, "text": styled(r["text"])} for r in clinc[300:450]]
    report, _ = fidelity(holdout, pool, synthetic, {"x": 1}, FidelityConfig(max_auc=0.8), seed=13)
    assert report["two_sample"]["auc"] > 0.95 and not report["passed"]
    dist = report["distribution"]
    assert dist["words_mean"]["synthetic"] - dist["words_mean"]["real"] > 8 and dist["length_ks"]["p_value"] < 1e-6
    write_html(report, tmp_path / "fidelity.html", "crafted")
    page = (tmp_path / "fidelity.html").read_text()
    assert "FAILED" in page and "AUC" in page


def test_the_most_synthetic_looking_rows_rank_first(clinc: list[dict[str, Any]]) -> None:
    plain, chatty = [r["text"] for r in clinc[300:400]], [styled(r["text"]) for r in clinc[400:450]]
    auc, p_synth = two_sample([r["text"] for r in clinc[:150]], plain + chatty, folds=5, seed=13)
    top50 = sorted(range(150), key=lambda i: -p_synth[i])[:50]
    assert sum(i >= 100 for i in top50) >= 45
    assert auc is not None and auc > 0.6


def test_label_proportions_are_compared_with_the_plan(clinc: list[dict[str, Any]]) -> None:
    synthetic = [{"text": f"my card {i} was declined", "label": "x"} for i in range(3)] + [{"text": "c d", "label": "y"}]
    report, _ = fidelity(clinc[:20], clinc[20:40], synthetic, {"x": 2, "y": 2}, FidelityConfig(folds=2), seed=1)
    labels = report["labels"]
    assert labels["per_label"]["x"]["accepted"] == 3 and labels["max_share_gap"] == pytest.approx(0.25)


def test_too_few_rows_give_no_verdict_but_a_failed_gate() -> None:
    report, p_synth = fidelity([{"text": "a", "label": "x", "source": "r"}], [], [{"text": "b", "label": "x"}], {"x": 1},
                               FidelityConfig(), seed=1)
    assert report["two_sample"]["auc"] is None and not report["passed"] and "too few" in report["two_sample"]["note"]


def test_a_script_label_and_title_are_escaped_in_the_fidelity_report(clinc: list[dict[str, Any]], tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    synthetic = [{**r, "label": evil} for r in clinc[300:310]]
    report, _ = fidelity(clinc[:20], clinc[20:40], synthetic, {evil: 10}, FidelityConfig(folds=2), seed=1)
    write_html(report | {"filters": {evil: {"entered": 3, "rejected": 1}}}, tmp_path / "fidelity.html", f"fidelity of {evil}")
    page = (tmp_path / "fidelity.html").read_text()
    assert "<script>" not in page and page.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") == 4  # title, h1, label, filter
    assert "Labels: plan vs accepted</h2>" in page and "planned: 10; accepted: 10" in page
