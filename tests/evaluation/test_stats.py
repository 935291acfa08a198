"""Bootstrap intervals and paired tests against hand-computed values and an independent implementation (scipy)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from microtune.evaluation.stats import Bootstrap, compare, mcnemar, paired_bootstrap_p, percentile_ci
from microtune.tasks import ClassifyConfig, get_task

LABELS = ["billing", "cards", "loans", "travel"]


def _accuracy_only(golds, preds):
    return {"accuracy": sum(g == p for g, p in zip(golds, preds)) / len(golds)}


def test_mcnemar_exact_and_mid_p_hand_computed() -> None:
    # b = 1 (only A right), c = 9 (only B right), n = 10: P(X <= 1) = 11/1024, P(X = 1) = 10/1024
    a = [True] * 1 + [False] * 9 + [True] * 5
    b = [False] * 1 + [True] * 9 + [True] * 5
    result = mcnemar(a, b)
    assert (result["b"], result["c"]) == (1, 9)
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert result["mid_p"] == pytest.approx(12 / 1024)


def test_mcnemar_no_disagreement_and_balanced() -> None:
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    balanced = mcnemar([True, False, True, False], [False, True, False, True])
    assert balanced["p_value"] == pytest.approx(1.0) and balanced["mid_p"] == pytest.approx(1.0)


def test_percentile_ci_of_a_known_sample() -> None:
    assert percentile_ci(np.arange(101, dtype=float), 0.90) == pytest.approx((5.0, 95.0))


def test_bootstrap_ci_matches_scipy_percentile_bootstrap() -> None:
    from scipy.stats import bootstrap

    rng = random.Random(0)
    correct = [rng.random() < 0.7 for _ in range(200)]
    golds, preds = ["a"] * 200, ["a" if c else "b" for c in correct]
    dist = Bootstrap(200, 4000, seed=1).distribution(golds, preds, _accuracy_only)
    ours = percentile_ci(dist["accuracy"])
    ref = bootstrap((np.array(correct, dtype=float),), np.mean, n_resamples=4000, method="percentile", rng=2).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.015) and ours[1] == pytest.approx(ref.high, abs=0.015)
    p = np.mean(correct)  # and the normal approximation of a proportion's interval
    assert ours[0] == pytest.approx(p - 1.96 * np.sqrt(p * (1 - p) / 200), abs=0.015)


def test_bootstrap_is_seeded() -> None:
    golds, preds = LABELS * 10, (LABELS[1:] + LABELS[:1]) * 5 + LABELS * 5
    one = Bootstrap(40, 200, seed=5).distribution(golds, preds, _accuracy_only)["accuracy"]
    two = Bootstrap(40, 200, seed=5).distribution(golds, preds, _accuracy_only)["accuracy"]
    other = Bootstrap(40, 200, seed=6).distribution(golds, preds, _accuracy_only)["accuracy"]
    assert np.array_equal(one, two) and not np.array_equal(one, other)


def test_fast_classification_path_equals_the_task_metrics_on_every_resample() -> None:
    task = get_task(ClassifyConfig(instruction="x"), LABELS)
    rng = random.Random(3)
    golds = [rng.choice(LABELS) for _ in range(60)]
    preds = [g if rng.random() < 0.6 else rng.choice([*LABELS, None]) for g in golds]
    boot = Bootstrap(60, 50, seed=2)
    fast = boot.distribution(golds, preds, task.metrics)
    for r, idx in enumerate(boot.indices):
        slow = task.metrics([golds[i] for i in idx], [preds[i] for i in idx])
        for key in ("accuracy", "macro_f1", "valid_rate"):
            assert fast[key][r] == pytest.approx(slow[key]), key


def test_generic_path_for_non_label_predictions() -> None:
    def overlap(golds, preds):  # a metric over token sets, as a generate/extract task would have
        return {"overlap": float(np.mean([len(set(g) & set(p)) / len(set(g)) for g, p in zip(golds, preds)]))}

    golds = [["a", "b"], ["c"], ["d", "e"], ["f"]] * 5
    preds = [["a"], ["c"], ["x"], ["f"]] * 5
    dist = Bootstrap(20, 100, seed=0).distribution(golds, preds, overlap)
    low, high = percentile_ci(dist["overlap"])
    assert low < overlap(golds, preds)["overlap"] < high


def test_paired_bootstrap_p_small_for_a_clear_gap_and_large_for_none() -> None:
    golds = LABELS * 25
    good = list(golds)
    bad = [LABELS[(LABELS.index(g) + 1) % 4] if i % 2 else g for i, g in enumerate(golds)]
    boot = Bootstrap(100, 500, seed=0)
    dist_good, dist_bad = (boot.distribution(golds, p, _accuracy_only) for p in (good, bad))
    assert paired_bootstrap_p(dist_good["accuracy"], dist_bad["accuracy"], 0.5) < 0.01
    assert paired_bootstrap_p(dist_good["accuracy"], dist_good["accuracy"], 0.0) == 1.0


def test_compare_reports_mcnemar_for_classification_only() -> None:
    golds = LABELS * 5
    a, b = list(golds), [LABELS[0]] * 20
    boot = Bootstrap(20, 100, seed=0)
    da, db = boot.distribution(golds, a, _accuracy_only), boot.distribution(golds, b, _accuracy_only)
    pa, pb = _accuracy_only(golds, a), _accuracy_only(golds, b)
    result = compare(golds, a, b, pa, pb, da, db, classification=True)
    assert result["mcnemar"]["b"] == 15 and result["mcnemar"]["c"] == 0
    assert result["metrics"]["accuracy"]["delta"] == pytest.approx(0.75)
    assert "mcnemar" not in compare(golds, a, b, pa, pb, da, db, classification=False)


def test_compare_gives_the_paired_difference_its_interval() -> None:
    """The interval of A − B comes from the shared resampled rows: for accuracy it is the percentile interval of the
    mean per-row difference of correctness over those rows (computed here without the metric functions)."""
    rng = random.Random(3)
    golds = [rng.choice(LABELS) for _ in range(60)]
    a = [g if rng.random() < 0.8 else LABELS[0] for g in golds]
    b = [g if rng.random() < 0.6 else LABELS[1] for g in golds]
    boot = Bootstrap(60, 400, seed=5)
    da, db = boot.distribution(golds, a, _accuracy_only), boot.distribution(golds, b, _accuracy_only)
    res = compare(golds, a, b, _accuracy_only(golds, a), _accuracy_only(golds, b), da, db, classification=True, confidence=0.9)
    per_row = np.array([(x == g) - (y == g) for g, x, y in zip(golds, a, b)], dtype=float)
    low, high = np.percentile(per_row[boot.indices].mean(axis=1), [5, 95])
    acc = res["metrics"]["accuracy"]
    assert acc["low"] == pytest.approx(low) and acc["high"] == pytest.approx(high)
    assert acc["low"] <= acc["delta"] <= acc["high"] and acc["high"] - acc["low"] > 0


def test_price_table_matches_device_names() -> None:
    from microtune.models.prices import hourly_price

    assert hourly_price("cuda", "NVIDIA A100-SXM4-80GB") == ("A100-80GB", 1.80)
    assert hourly_price("cuda", "NVIDIA H200") == ("H200", 3.80)
    assert hourly_price("cuda", "Tesla T4") == ("T4", 0.35)
    assert hourly_price("cuda", "Some Future GPU") == ("Some Future GPU", None)
    assert hourly_price("cpu", threads=2) == ("2 CPU cores", pytest.approx(0.0893))
