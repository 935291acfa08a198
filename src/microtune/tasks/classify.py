"""Task ``classify``: one text in, one label out.

Rows are normalised to ``{"text": str, "label": str}``. The micro-model's prompt is the recipe's
instruction (system) and the text (user); the completion is the label. Prompted baselines also get
the label list and, for few-shot, example turns. Metrics: accuracy and macro-F1 (+ per-label F1).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from microtune.config import TaskConfig


class ClassifyTask:
    name = "classify"

    def __init__(self, cfg: TaskConfig, labels: Sequence[str]):
        self.cfg = cfg
        self.labels = list(labels)

    # -- rows -------------------------------------------------------------------------------------
    @staticmethod
    def normalize(row: dict[str, Any], cfg: TaskConfig) -> tuple[dict[str, str] | None, list[tuple[str, Any]]]:
        """Map a raw row to an example; on failure return ``None`` and ``(reason, got)`` pairs."""
        problems: list[tuple[str, Any]] = []
        out: dict[str, str] = {}
        for key, field in (("text", cfg.text_field), ("label", cfg.label_field)):
            if field not in row:
                problems.append((f"missing field {field!r}", f"keys {sorted(row)}"))
            elif not isinstance(row[field], str):
                problems.append((f"field {field!r} is not a string", row[field]))
            elif not row[field].strip():
                problems.append((f"field {field!r} is empty", row[field]))
            else:
                out[key] = row[field].strip()
        return (None, problems) if problems else (out, [])

    @staticmethod
    def label_of(example: dict[str, str]) -> str:
        return example["label"]

    # -- prompts ----------------------------------------------------------------------------------
    def messages(self, example: dict[str, str], *, label_list: bool = False,
                 shots: Sequence[dict[str, str]] = ()) -> list[dict[str, str]]:
        """Chat messages up to (not including) the answer."""
        system = self.cfg.instruction
        if label_list:
            system += "\nAnswer with exactly one of these labels and nothing else: " + ", ".join(self.labels) + "."
        msgs = [{"role": "system", "content": system}]
        for shot in shots:
            msgs += [{"role": "user", "content": shot["text"]}, {"role": "assistant", "content": shot["label"]}]
        return msgs + [{"role": "user", "content": example["text"]}]

    def target(self, example: dict[str, str]) -> str:
        return example["label"]

    def candidates(self) -> list[str]:
        """Every valid completion: constrained decoding picks among these."""
        return self.labels

    def parse(self, output: str) -> str | None:
        """Map raw model output to a label, or ``None`` when it is none of them."""
        text = output.strip().strip(".").strip()
        if text in self.labels:
            return text
        lowered = {label.lower(): label for label in self.labels}
        return lowered.get(text.lower())

    # -- metrics ----------------------------------------------------------------------------------
    def metrics(self, golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, Any]:
        from sklearn.metrics import f1_score

        preds_ = [p if p is not None else "<invalid>" for p in preds]
        labels = sorted(set(golds))
        per_label = f1_score(golds, preds_, labels=labels, average=None, zero_division=0)
        return {
            "accuracy": sum(g == p for g, p in zip(golds, preds_)) / max(len(golds), 1),
            "macro_f1": float(per_label.mean()) if len(labels) else 0.0,
            "valid_rate": sum(p is not None for p in preds) / max(len(preds), 1),
            "per_label_f1": {label: float(f) for label, f in zip(labels, per_label)},
        }
