"""Drift statistics between reference rows (what the champion learned from) and newly arrived rows.

    label_shift(ref_labels, new_labels)   # {"chi2", "p_value", "psi", "new_labels": {label: n}}
    text_drift_auc(ref_texts, new_texts)  # cross-validated AUC of a reference-vs-new text classifier

Label shift: a chi-square test of the 2×K table of label counts (Yates' correction when K = 2, as
scipy applies it) and the population stability index Σ (q−p)·ln(q/p) over the known labels, with
Jeffreys smoothing (half a row added to every label) so empty cells stay finite. PSI on a few dozen
rows over many labels is mostly sampling noise (40 rows drawn from 28 equally likely labels: PSI ≈ 0.4–0.5,
chi-square p ≈ 0.2–0.6), so watch fires on a label shift only when both say so: significant and large.
Text drift: TF-IDF + logistic regression asked to tell new texts from reference texts; 0.5 means indistinguishable, near 1.0 a different kind of text.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

SMOOTHING = 0.5  # Jeffreys: rows added to every label's count before PSI


def label_shift(ref: Sequence[str], new: Sequence[str]) -> dict[str, Any]:
    from scipy.stats import chi2_contingency

    ref_counts, new_counts = Counter(ref), Counter(new)
    known = sorted(ref_counts)
    fresh = {label: n for label, n in sorted(new_counts.items()) if label not in ref_counts}
    out: dict[str, Any] = {"new_labels": fresh, "chi2": 0.0, "p_value": 1.0, "psi": 0.0}
    in_known = sum(new_counts[label] for label in known)
    if len(known) < 2 or in_known == 0:
        return out
    cols = [label for label in known if ref_counts[label] + new_counts[label] > 0]
    chi2, p, _, _ = chi2_contingency([[ref_counts[c] for c in cols], [new_counts[c] for c in cols]])
    k = len(known)
    p_ref = {c: (ref_counts[c] + SMOOTHING) / (len(ref) + SMOOTHING * k) for c in known}
    p_new = {c: (new_counts[c] + SMOOTHING) / (in_known + SMOOTHING * k) for c in known}
    psi = sum((p_new[c] - p_ref[c]) * math.log(p_new[c] / p_ref[c]) for c in known)
    return out | {"chi2": float(chi2), "p_value": float(p), "psi": float(psi)}


def text_drift_auc(ref: Sequence[str], new: Sequence[str], seed: int = 13) -> float:
    """Cross-validated ROC AUC of telling new texts from reference texts (reference subsampled to balance)."""
    import random

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline

    ref = random.Random(seed).sample(list(ref), min(len(ref), max(len(new), 1) * 3))
    texts, y = [*ref, *new], [0] * len(ref) + [1] * len(new)
    folds = min(5, len(new), len(ref))
    if folds < 2:
        return 0.5
    clf = make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1), LogisticRegression(max_iter=1000))
    scores = cross_val_score(clf, texts, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="roc_auc")
    return float(scores.mean())
