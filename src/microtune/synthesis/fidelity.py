"""Fidelity of synthetic rows against real rows held out before generation (never shown to the teacher).

    report, p_synth = fidelity(holdout, pool, synthetic, planned, cfg, seed)
    write_html(report, folder / "fidelity.html")

Tests:
- a classifier two-sample test: TF-IDF + logistic regression tells real (holdout) from synthetic,
  cross-validated; AUC 0.5 = indistinguishable, 1.0 = trivially told apart; ``max_auc`` is the gate.
  Its out-of-fold P(synthetic) per row lets a recipe drop the rows that look most synthetic;
- length (word counts, two-sample Kolmogorov-Smirnov) and vocabulary (out-of-vocabulary rate,
  distinct bigrams) against the holdout;
- label proportions of the accepted rows against the plan (``labels``; for a task without labels the same
  per stratum, ``strata``);
- probes on the holdout: train on real (the rows the teacher saw), on synthetic, and on both — only where
  rows have labels (the probe is a label classifier);
- for rows with a ``target`` (generate), length and vocabulary of the targets too (``target_distribution``).

The classifier and the length/vocabulary tests read the input texts, so they apply to every task type.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from microtune.config import FidelityConfig
from microtune.core.templating import render
from microtune.synthesis.filters import probe, text_features
from microtune.synthesis.plan import stratum_of

Row = dict[str, Any]


def two_sample(real: list[str], synthetic: list[str], folds: int, seed: int) -> tuple[float | None, np.ndarray]:
    """Cross-validated AUC of real-vs-synthetic, and the out-of-fold P(synthetic) of each synthetic text."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    k = min(folds, len(real), len(synthetic))
    if k < 2:
        return None, np.full(len(synthetic), np.nan)
    y = np.array([0] * len(real) + [1] * len(synthetic))
    model = make_pipeline(text_features(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    proba = cross_val_predict(model, real + synthetic, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba)), proba[len(real):]


def _words(texts: list[str]) -> list[list[str]]:
    return [t.lower().split() for t in texts]


def distribution(real: list[str], synthetic: list[str]) -> dict[str, Any]:
    """Length and vocabulary of synthetic vs real texts."""
    from scipy.stats import ks_2samp

    rw, sw = _words(real), _words(synthetic)
    rl, sl = [len(w) for w in rw], [len(w) for w in sw]
    ks = ks_2samp(rl, sl) if rl and sl else None
    vocab = {w for ws in rw for w in ws}
    tokens = [w for ws in sw for w in ws]
    return {
        "words_mean": {"real": _mean(rl), "synthetic": _mean(sl)},
        "words_p50": {"real": _pct(rl, 50), "synthetic": _pct(sl, 50)},
        "length_ks": {"statistic": float(ks.statistic), "p_value": float(ks.pvalue)} if ks else None,
        "synthetic_oov_rate": sum(w not in vocab for w in tokens) / len(tokens) if tokens else None,
        "distinct_2": {"real": _distinct2(rw), "synthetic": _distinct2(sw)},
    }


def _mean(xs: list[int]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _pct(xs: list[int], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def _distinct2(rows: list[list[str]]) -> float | None:
    """Distinct word bigrams / all bigrams: lower means more repetitive text."""
    grams = [tuple(ws[i: i + 2]) for ws in rows for i in range(len(ws) - 1)]
    return len(set(grams)) / len(grams) if grams else None


def proportions(synthetic: list[Row], planned: dict[str, int]) -> dict[str, Any]:
    got, total_plan = Counter(stratum_of(r) for r in synthetic), sum(planned.values()) or 1
    total = sum(got.values()) or 1
    rows = {label: {"planned": n, "accepted": got[label], "planned_share": n / total_plan, "accepted_share": got[label] / total}
            for label, n in planned.items()}
    return {"per_label": rows, "max_share_gap": max((abs(v["planned_share"] - v["accepted_share"]) for v in rows.values()), default=0.0)}


def probes(holdout: list[Row], pool: list[Row], synthetic: list[Row], seed: int) -> dict[str, Any]:
    """Macro-F1 and accuracy on the holdout of the same probe trained on real, synthetic, and real + synthetic rows."""
    from sklearn.metrics import accuracy_score, f1_score

    golds, out = [r["label"] for r in holdout], {}
    for name, rows in (("train_real", pool), ("train_synthetic", synthetic), ("train_real_plus_synthetic", pool + synthetic)):
        if not holdout or len({r["label"] for r in rows}) < 2:
            out[name] = None
            continue
        preds = list(probe(rows, seed).predict([r["text"] for r in holdout]))
        out[name] = {"macro_f1": float(f1_score(golds, preds, average="macro", zero_division=0)),
                     "accuracy": float(accuracy_score(golds, preds)), "train_rows": len(rows)}
    return out


def fidelity(holdout: list[Row], pool: list[Row], synthetic: list[Row], planned: dict[str, int], cfg: FidelityConfig,
             seed: int, labelled: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """The report (``passed`` applies the AUC gate) and the out-of-fold P(synthetic) of each synthetic row.
    ``labelled``: rows carry task labels (the plan's strata are labels, the probes apply)."""
    real_texts, syn_texts = [r["text"] for r in holdout], [r["text"] for r in synthetic]
    auc, p_synth = two_sample(real_texts, syn_texts, cfg.folds, seed)
    report = {
        "holdout_rows": len(holdout), "synthetic_rows": len(synthetic),
        "two_sample": {"auc": auc, "max_auc": cfg.max_auc, "folds": cfg.folds,
                       "note": None if auc is not None else "too few rows for a cross-validated test"},
        "distribution": distribution(real_texts, syn_texts),
    }
    if labelled:
        report |= {"labels": proportions(synthetic, planned), "probes": probes(holdout, pool, synthetic, seed)}
    else:
        report["strata"] = proportions(synthetic, planned)
    if holdout and all("target" in r for r in holdout + synthetic):
        report["target_distribution"] = distribution([r["target"] for r in holdout], [r["target"] for r in synthetic])
    report["passed"] = auc is not None and auc <= cfg.max_auc
    return report, p_synth


def write_html(report: dict[str, Any], path: Path, title: str) -> None:
    """A one-page report: the verdict, then every test as a table (``core/templates/synth/fidelity.html``, autoescaped)."""
    path.write_text(render("synth/fidelity.html", title=title, report=report) + "\n", encoding="utf-8")
