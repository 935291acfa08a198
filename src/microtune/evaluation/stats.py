"""Confidence intervals and paired significance tests for any task's metrics.

    boot = Bootstrap(n_examples=len(golds), n_resamples=1000, seed=13)
    dist = boot.distribution(golds, preds, task.metrics)          # {metric: array of resampled values}
    ci = percentile_ci(dist["accuracy"])                          # (low, high), 95 %
    mcnemar([g == p for ...], [g == q for ...])                   # exact and mid-p McNemar
    paired_bootstrap_p(dist_a["rouge_l"], dist_b["rouge_l"], observed_delta)

Everything takes per-example gold/prediction lists and a metric function ``(golds, preds) -> dict``
(a task's ``metrics``), so it works for every task type; numeric top-level entries get intervals.

One seeded matrix of resampled example indices is drawn per evaluation and shared by every system:
the interval of each system and the paired difference between two systems come from the *same*
resamples, which is what makes the bootstrap comparison paired.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, Any]]


def scalar_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The numeric top-level entries of a metrics dict (the ones an interval makes sense for)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Bootstrap:
    """Percentile bootstrap over examples with a fixed, seeded index matrix (``n_resamples`` × ``n_examples``)."""

    n_examples: int
    n_resamples: int = 1000
    seed: int = 13

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.indices = rng.integers(0, self.n_examples, size=(self.n_resamples, self.n_examples))

    def distribution(self, golds: Sequence[Any], preds: Sequence[Any], metric_fn: MetricFn) -> dict[str, np.ndarray]:
        """Every numeric metric recomputed on each resample: ``{metric: array of n_resamples values}``."""
        if len(golds) != self.n_examples or len(preds) != self.n_examples:
            raise ValueError(f"expected {self.n_examples} golds and predictions, got {len(golds)} and {len(preds)}")
        fast = _single_label_fast(golds, preds, self.indices, metric_fn)
        if fast is not None:
            return fast
        rows: dict[str, list[float]] = {}
        for idx in self.indices:
            values = scalar_metrics(metric_fn([golds[i] for i in idx], [preds[i] for i in idx]))
            for key, value in values.items():
                rows.setdefault(key, []).append(value)
        return {k: np.asarray(v) for k, v in rows.items()}


def _single_label_metrics(golds: Sequence[Any], preds: Sequence[Any], indices: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, macro-F1 (over the labels present in each resample's golds) and valid_rate of every
    resample at once, from one confusion matrix per resample (a bincount), instead of n_resamples calls."""
    vocab = {v: i for i, v in enumerate(sorted({*golds, *(p for p in preds if p is not None)}))}
    size = len(vocab) + 1  # the last index stands for an invalid (None) prediction
    g = np.array([vocab[x] for x in golds])
    p = np.array([vocab.get(x, size - 1) if x is not None else size - 1 for x in preds])
    r, n = indices.shape
    flat = (np.arange(r)[:, None] * size * size + g[indices] * size + p[indices]).ravel()
    conf = np.bincount(flat, minlength=r * size * size).reshape(r, size, size)
    tp, gold_n, pred_n = np.diagonal(conf, axis1=1, axis2=2), conf.sum(2), conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(gold_n + pred_n > 0, 2 * tp / (gold_n + pred_n), 0.0)
    present = gold_n[:, : size - 1] > 0
    macro = (f1[:, : size - 1] * present).sum(1) / np.maximum(present.sum(1), 1)
    return {"accuracy": tp[:, : size - 1].sum(1) / n, "macro_f1": macro, "valid_rate": 1 - conf[:, :, size - 1].sum(1) / n}


def _single_label_fast(golds: Sequence[Any], preds: Sequence[Any], indices: np.ndarray, metric_fn: MetricFn) -> dict[str, np.ndarray] | None:
    """The vectorised path, used only where it reproduces ``metric_fn`` exactly on the full data (string
    labels, same metric names and values); any other task or metric definition takes the generic path."""
    if not all(isinstance(x, str) for x in golds) or not all(x is None or isinstance(x, str) for x in preds):
        return None
    expected = scalar_metrics(metric_fn(list(golds), list(preds)))
    full = _single_label_metrics(golds, preds, np.arange(len(golds))[None, :])
    if set(expected) != set(full) or any(abs(expected[k] - float(full[k][0])) > 1e-9 for k in expected):
        return None
    return _single_label_metrics(golds, preds, indices)


def percentile_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval: the (1-c)/2 and (1+c)/2 quantiles of the resampled values."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, Any]:
    """McNemar's test on paired correctness: exact binomial p-value and mid-p (Fagerland et al., 2013).

    ``b`` = examples only A gets right, ``c`` = only B. Under H0 (equal accuracy) b ~ Binomial(b + c, 1/2).
    The mid-p subtracts half the probability of the observed count on each side; it keeps the
    error rate close to nominal where the exact test is conservative.
    """
    from scipy.stats import binom, binomtest

    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired lists differ in length: {len(correct_a)} vs {len(correct_b)}")
    b = sum(bool(x) and not bool(y) for x, y in zip(correct_a, correct_b))
    c = sum(bool(y) and not bool(x) for x, y in zip(correct_a, correct_b))
    n = b + c
    if n == 0:  # the systems never disagree: no evidence of a difference
        return {"test": "mcnemar", "b": 0, "c": 0, "p_value": 1.0, "mid_p": 1.0}
    exact = binomtest(min(b, c), n, 0.5).pvalue
    # mid-p = 2·(P(X ≤ k) − ½·P(X = k)) = exact − P(X = k); at b = c both are 1
    mid = exact - binom.pmf(min(b, c), n, 0.5) if b != c else 1.0
    return {"test": "mcnemar", "b": b, "c": c, "p_value": float(min(exact, 1.0)), "mid_p": float(mid)}


def paired_bootstrap_p(samples_a: np.ndarray, samples_b: np.ndarray, observed_delta: float) -> float:
    """Two-sided p-value of ``metric(A) - metric(B) = 0`` from paired resamples (same index rows).

    The resampled differences are centred on the observed one to approximate the null distribution;
    p is the share of them at least as far from zero as the observed difference, with the +1 correction
    so a finite number of resamples never reports p = 0.
    """
    deltas = np.asarray(samples_a) - np.asarray(samples_b)
    extreme = np.abs(deltas - observed_delta) >= abs(observed_delta) - 1e-12
    return float((extreme.sum() + 1) / (len(deltas) + 1))


def interval_table(point: dict[str, Any], dist: dict[str, np.ndarray], confidence: float) -> dict[str, dict[str, float]]:
    """``{metric: {value, low, high}}`` for every numeric metric of one system."""
    out = {}
    for key, value in scalar_metrics(point).items():
        if key in dist:
            low, high = percentile_ci(dist[key], confidence)
            out[key] = {"value": value, "low": low, "high": high}
    return out


def compare(golds: Sequence[Any], preds_a: Sequence[Any], preds_b: Sequence[Any], point_a: dict[str, Any],
            point_b: dict[str, Any], dist_a: dict[str, np.ndarray], dist_b: dict[str, np.ndarray],
            classification: bool, confidence: float = 0.95) -> dict[str, Any]:
    """A (the micro-model) vs B (a baseline): McNemar on correctness for classification, and for every numeric metric
    the difference A − B with its paired bootstrap p-value and percentile interval (``low``/``high``: the two systems'
    resamples share their rows, so their differences are the paired difference's distribution)."""
    out: dict[str, Any] = {"metrics": {}}
    for key in scalar_metrics(point_a):
        if key in dist_a and key in dist_b and key in point_b:
            delta = float(point_a[key]) - float(point_b[key])
            low, high = percentile_ci(np.asarray(dist_a[key]) - np.asarray(dist_b[key]), confidence)
            out["metrics"][key] = {"delta": delta, "low": low, "high": high,
                                   "p_value": paired_bootstrap_p(dist_a[key], dist_b[key], delta), "test": "paired bootstrap"}
    if classification:
        out["mcnemar"] = mcnemar([g == p for g, p in zip(golds, preds_a)], [g == p for g, p in zip(golds, preds_b)])
    return out
