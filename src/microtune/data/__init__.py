"""Data: readers (JSONL, CSV, OpenAI chat JSONL), row validation, splits, leakage checks, stats."""
from microtune.data.dataset import SPLITS, DatasetResult, build_dataset, imbalance, load_rows, read_split, write_dataset
from microtune.data.drift import label_shift, text_drift_auc
from microtune.data.stats import compute_stats

__all__ = ["SPLITS", "DatasetResult", "build_dataset", "compute_stats", "imbalance", "label_shift", "load_rows", "read_split",
           "text_drift_auc", "write_dataset"]
