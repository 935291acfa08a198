"""Evaluation stage: constrained prediction and the micro-model vs prompted baselines."""
from microtune.evaluate.predict import LabelPredictor, build_trie, common_prefix
from microtune.evaluate.runner import MICRO, evaluate_systems, pick_shots

__all__ = ["MICRO", "LabelPredictor", "build_trie", "common_prefix", "evaluate_systems", "pick_shots"]
