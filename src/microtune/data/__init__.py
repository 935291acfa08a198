"""Data: readers (JSONL, CSV, OpenAI chat JSONL), row validation, splits, leakage checks, stats."""
from microtune.data.dataset import SPLITS, DatasetResult, build_dataset, imbalance, read_split, write_dataset
from microtune.data.stats import compute_stats

__all__ = ["SPLITS", "DatasetResult", "build_dataset", "compute_stats", "imbalance", "read_split", "write_dataset"]
