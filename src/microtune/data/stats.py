"""Dataset statistics for the check report: rows, labels, token lengths, loss share, duplicates."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from microtune.data.dataset import SPLITS, normalize_text
from microtune.tasks.render import IGNORE, labels_of


def compute_stats(splits: dict[str, list[dict[str, Any]]], labels: list[str], encode, max_len: int | None = None) -> dict[str, Any]:
    """``encode(example) -> (prompt_ids, completion_ids[, labels])`` is the encoding before any cut, so the lengths are the
    rows' own; with ``max_len`` (train.max_seq_len), ``over_max_seq_len`` counts the train rows training will cut. The loss
    share counts the tokens that get loss (a conversation's trained turns, not only its last reply)."""
    stats: dict[str, Any] = {"rows": {s: len(splits[s]) for s in SPLITS}, "labels": labels, "per_label": {}}
    for name in SPLITS:
        stats["per_label"][name] = dict(Counter(a for e in splits[name] for a in e.get("labels", [e.get("label")]) if a).most_common())
    lengths, completion, long = [], [], []
    for ex in splits["train"]:
        encoded = encode(ex)
        lengths.append(len(encoded[0]) + len(encoded[1]))
        completion.append(sum(label != IGNORE for label in labels_of(encoded)))
        if max_len is not None and lengths[-1] > max_len:
            long.append(ex.get("source"))
    if max_len is not None:
        stats["over_max_seq_len"] = {"rows": len(long), "max_seq_len": max_len, "first": long[:5]}
    if lengths:
        arr = np.array(lengths)
        stats["train_tokens"] = {f"p{q}": int(np.percentile(arr, q)) for q in (50, 90, 99)} | {"max": int(arr.max()), "total": int(arr.sum())}
        stats["loss_token_share"] = round(sum(completion) / arr.sum(), 4)
        counts, edges = np.histogram(arr, bins=min(20, max(1, len(set(lengths)))))
        stats["train_tokens_histogram"] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}  # the Studio's data page
    stats["duplicates"] = {s: len(splits[s]) - len({normalize_text(e["text"]) for e in splits[s]}) for s in SPLITS}
    train_keys = {normalize_text(e["text"]) for e in splits["train"]}
    stats["overlap_with_train"] = {s: sum(normalize_text(e["text"]) in train_keys for e in splits[s]) for s in ("valid", "test")}
    return stats
