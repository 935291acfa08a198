"""Evaluation stage: the micro-model vs prompted baselines and endpoints on the test split, with intervals and a report."""
from microtune.evaluation.report import render_report
from microtune.evaluation.runner import (
    MICRO,
    Answer,
    evaluate_systems,
    pick_shots,
    predict_examples,
    preflight,
    score_examples,
    similar_shots,
)

__all__ = ["MICRO", "Answer", "evaluate_systems", "pick_shots", "predict_examples", "preflight", "render_report", "score_examples",
           "similar_shots"]
