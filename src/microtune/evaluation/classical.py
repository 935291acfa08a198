"""The `classical` baseline for classify: TF-IDF features + logistic regression, fitted on the same train split.

    model = fit(task, train_rows)               # seconds at most; deterministic (lbfgs, no sampling)
    model.predict(test_rows)                    # [(answer, probability of that answer), ...] like every other system

Why it is there: a fine-tuned language model that does not beat a linear model on word counts is not worth
serving. The features are word unigrams and bigrams, sublinear TF, IDF-weighted (fitted on the train texts);
the classifier is scikit-learn's ``LogisticRegression`` with its defaults (L2, C=1). ``none_label`` is a label
like any other: the out-of-scope rows of train are one more class. Where the micro-model's training balances the
labels (``train.balance`` resolving to ``sample`` or ``weight``), the fit weighs each row the same way (count^-power):
on faa-maintenance, where one cause is ~70 % of train, unweighted it answered that cause for 299 of 300 test reports
(macro-F1 0.152) and weighted it scores 0.384 — a baseline left without the micro-model's balancing flattered it.

Single label: one multinomial model over the labels; the probability is that of the predicted label.
Multi-label: one binary model per label (a label with no positive or no negative row in train gets its smoothed
train frequency), then the best *valid answer*: every label set the task's decoder allows (up to ``max_labels``
labels, the micro-model's candidates) is scored as the product of its labels' probabilities and the others'
complements, and the argmax is the answer; its probability is that score normalised over the candidates. So
the classical model answers from the same closed set as the micro-model, including sets never seen in train.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from microtune.tasks import Task
from microtune.tasks.classify import JOIN

NAME = "classical"


class Classical:
    """A fitted TF-IDF + logistic-regression classifier over a task's answers."""

    def __init__(self, vectorizer: Any, predict_matrix: Any) -> None:
        self.vectorizer = vectorizer
        self._predict_matrix = predict_matrix

    def predict(self, rows: Sequence[dict[str, Any]]) -> list[tuple[str, float]]:
        """Each row's answer and its probability, in order."""
        if not rows:
            return []
        return self._predict_matrix(self.vectorizer.transform([r["text"] for r in rows]))


def fit(task: Task, train: Sequence[dict[str, Any]], weights: Sequence[float] | None = None) -> Classical:
    """Fit on the train rows of a task whose decoder picks among a closed label set (classify); ``weights`` per row are
    the micro-model's class balancing (``data.balance``), so both learn from the same weighted train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    spec = task.decoder()
    if spec.kind != "labels" or not train:
        raise ValueError(f"the classical baseline needs a labelled train split and a closed label set; task {task.name!r} "
                         f"decodes {spec.kind!r} with {len(train)} train rows")
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2))
    x = vectorizer.fit_transform([r["text"] for r in train])
    if getattr(task.cfg, "multi_label", False):
        return Classical(vectorizer, _fit_label_sets(x, [task.atoms_of(r) for r in train], sorted(task.labels), spec.candidates or [],
                                                     weights))
    return Classical(vectorizer, _fit_single(x, [task.label_of(r) for r in train], weights))


def _fit_single(x: Any, labels: list[str], weights: Sequence[float] | None = None) -> Any:
    """One multinomial logistic regression over the labels seen in train (one label only: always that label)."""
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(labels))
    if len(classes) == 1:
        return lambda m: [(classes[0], 1.0)] * m.shape[0]
    model = LogisticRegression(max_iter=1000).fit(x, labels, sample_weight=weights)

    def predict(m: Any) -> list[tuple[str, float]]:
        proba = model.predict_proba(m)
        best = proba.argmax(axis=1)
        return [(str(model.classes_[j]), float(proba[i, j])) for i, j in enumerate(best)]

    return predict


def _fit_label_sets(x: Any, atoms: list[list[str]], labels: list[str], candidates: list[str],
                    weights: Sequence[float] | None = None) -> Any:
    """One binary model per label, then the most probable candidate label set (see the module docstring)."""
    y = np.array([[label in row for label in labels] for row in atoms], dtype=int)
    per_label = [_binary(x, y[:, k], weights) for k in range(len(labels))]
    member = np.array([[label in c.split(JOIN) for label in labels] for c in candidates], dtype=float)  # candidates × labels

    def predict(m: Any) -> list[tuple[str, float]]:
        p = np.clip(np.column_stack([f(m) for f in per_label]), 1e-9, 1 - 1e-9)  # rows × labels
        score = np.log(p) @ member.T + np.log1p(-p) @ (1 - member).T           # rows × candidates: log P(set)
        best = score.argmax(axis=1)
        norm = np.logaddexp.reduce(score, axis=1)
        return [(candidates[j], float(np.exp(score[i, j] - norm[i]))) for i, j in enumerate(best)]

    return predict


def _binary(x: Any, y: np.ndarray, weights: Sequence[float] | None = None) -> Any:
    """P(label) per row: a logistic regression, or the smoothed train frequency when train has one class only."""
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():
        rate = (y.sum() + 0.5) / (len(y) + 1)
        return lambda m: np.full(m.shape[0], rate)
    model = LogisticRegression(max_iter=1000).fit(x, y, sample_weight=weights)
    return lambda m: model.predict_proba(m)[:, 1]
