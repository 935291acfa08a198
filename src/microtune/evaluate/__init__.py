"""Evaluation stage: the micro-model vs prompted baselines on the test split."""
from microtune.evaluate.runner import MICRO, evaluate_systems, pick_shots

__all__ = ["MICRO", "evaluate_systems", "pick_shots"]
