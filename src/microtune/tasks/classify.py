"""Task ``classify``: one text in, one label out — or a set of labels (``multi_label``), with an optional
out-of-scope label (``none_label``).

Rows are normalised to ``{"text": str, "label": str}``; with multi_label, ``label`` is the canonical
answer — the sorted labels joined by ``"; "`` — and ``labels`` the list. The micro-model's prompt is
the recipe's instruction (system) and the text (user); the completion is the label (answer string).
Prompted baselines also get the label list and, for few-shot, example turns. Constrained decoding picks
among ``candidates()``: the labels, or every label set of up to ``max_labels`` labels.
Metrics: accuracy and macro-F1 (+ per-label F1); multi-label: exact match, micro/macro-F1 over labels;
with a none_label: in-scope accuracy and out-of-scope precision/recall (the CLINC150 measures). The main
metric is the first of ``metric_names``: accuracy, or exact match with multi_label.

Synth: a request asks for ``n`` examples of one label (the plan's stratum),
showing real rows of that label; each item of the answer is checked by this task's own row schema.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any, Literal

from pydantic import Field, model_validator

from microtune.tasks.base import (
    DEFAULT_SCORING,
    PROMPTED,
    DecoderSpec,
    Message,
    Row,
    RowProblems,
    Scoring,
    SynthAsk,
    SynthHooks,
    TaskBase,
    TaskSection,
    check_text,
    example_rate,
    shot_turns,
    type_field,
)

JOIN = "; "


class ClassifyConfig(TaskSection):
    """Task `classify`: text → one label, or a set of labels with multi_label."""

    type: Literal["classify"] = type_field("classify")
    labels: list[str] | None = Field(
        None, description="classify: the label set. Omitted: inferred from the train split (sorted)."
    )
    label_field: str = Field("label", description="classify: field that holds the label (a list, or `a;b` text, with multi_label).")
    multi_label: bool = Field(False, description="classify: each text has one or more labels; the answer is a set of labels.")
    max_labels: int = Field(2, ge=1, le=4, description="classify with multi_label: most labels one text can carry.")
    label_separator: str = Field(";", min_length=1, description="classify with multi_label: separator of labels given as text.")
    none_label: str | None = Field(
        None, description="classify: the out-of-scope label (e.g. `oos`, 'none of these'); adds in-scope accuracy and "
        "out-of-scope precision/recall to the metrics."
    )
    scoring: Scoring = Field(
        DEFAULT_SCORING, description="classify: how the answer is picked among the labels (label sets with multi_label), in eval "
        "and serve alike: `loglik` (default) ranks every answer by its full-sequence log-likelihood (probability = softmax over "
        "the answers; answers that cannot win are pruned by their first token); `trie` walks the label token trie greedily."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ClassifyConfig:
        if self.labels is not None:
            if not self.labels:
                raise ValueError("labels is empty; list the labels or omit the key to infer them")
            dupes = sorted({x for x in self.labels if self.labels.count(x) > 1})
            if dupes:
                raise ValueError(f"labels repeat: {dupes}")
        if self.none_label and self.labels is not None and self.none_label not in self.labels:
            raise ValueError(f"none_label {self.none_label!r} is not in labels")
        return self

    def declared_labels(self) -> list[str] | None:
        return self.labels


class ClassifyTask(TaskBase):
    name = "classify"
    config = ClassifyConfig
    has_labels = True
    baselines = (*PROMPTED, "classical")  # TF-IDF + logistic regression on the train split (evaluation/classical.py)

    cfg: ClassifyConfig

    # -- rows -------------------------------------------------------------------------------------
    @staticmethod
    def normalize(row: dict[str, Any], cfg: ClassifyConfig) -> tuple[Row | None, RowProblems]:
        """Map a raw row to an example; on failure return ``None`` and ``(reason, got)`` pairs."""
        text, problems = check_text(row, cfg.text_field)
        labels = _labels_of(row, cfg, problems)
        if problems:
            return None, problems
        if cfg.multi_label:
            return {"text": text, "label": JOIN.join(labels), "labels": labels}, []
        return {"text": text, "label": labels[0]}, []

    @staticmethod
    def label_of(example: dict[str, Any]) -> str:
        return example["label"]

    @classmethod
    def atoms_of(cls, example: dict[str, Any]) -> list[str]:
        """The labels of an example (one, or several with multi_label) — what task.labels must contain."""
        return example.get("labels", [example["label"]])

    # -- prompts ----------------------------------------------------------------------------------
    def messages(self, example: dict[str, Any], *, label_list: bool = False,
                 shots: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
        """Chat messages up to (not including) the answer."""
        system = self.cfg.instruction
        if label_list:
            if self.cfg.multi_label:
                system += (f"\nAnswer with one to {self.cfg.max_labels} of these labels, in this order, separated by "
                           f"'{JOIN.strip()} ', and nothing else: " + ", ".join(sorted(self.labels)) + ".")
            else:
                system += "\nAnswer with exactly one of these labels and nothing else: " + ", ".join(self.labels) + "."
        return [{"role": "system", "content": system}, *shot_turns(shots, self.target),
                {"role": "user", "content": example["text"]}]

    def target(self, example: dict[str, Any]) -> str:
        return example["label"]

    def decoder(self) -> DecoderSpec:
        """Every valid answer — the labels, or every label set of up to ``max_labels`` labels — and how the answer is
        picked among them (``task.scoring``). With multi_label, ``loglik`` ranks the label-set strings themselves (the
        sequences the model was trained to write), not each label on its own."""
        return DecoderSpec(kind="labels", candidates=self._answers(), scoring=self.cfg.scoring)

    def _answers(self) -> list[str]:
        """Every valid answer: constrained decoding picks among these."""
        if not self.cfg.multi_label:
            return self.labels
        ordered = sorted(self.labels)
        return [JOIN.join(c) for k in range(1, self.cfg.max_labels + 1) for c in combinations(ordered, k)]

    def gold(self, example: dict[str, Any]) -> str:
        return example["label"]

    def parse(self, output: str) -> str | None:
        """Map raw model output to a valid answer, or ``None`` when it is none of them."""
        text = output.strip().strip(".").strip()
        if self.cfg.multi_label:
            known = {label.lower(): label for label in self.labels}
            parts = [known.get(p.strip().lower(), p.strip()) for p in text.replace(",", ";").split(";") if p.strip()]
            text = JOIN.join(sorted(set(parts)))
        valid = self._answers()
        if text in valid:
            return text
        return {c.lower(): c for c in valid}.get(text.lower())

    # -- metrics ----------------------------------------------------------------------------------
    @classmethod
    def metric_names(cls, cfg: ClassifyConfig, every: bool = False) -> list[str]:
        names = ["exact_match", "micro_f1", "macro_f1"] if cfg.multi_label else ["accuracy", "macro_f1"]
        if cfg.none_label and not cfg.multi_label:
            names += ["in_scope_accuracy", "oos_recall"] + (["oos_precision"] if every else [])
        return names + (["valid_rate"] if every else [])

    def example_scores(self, golds: Sequence[str], preds: Sequence[str | None]) -> list[float]:
        """Per-example correctness (1/0): what the paired tests compare."""
        return [float(g == p) for g, p in zip(golds, preds)]

    def metrics(self, golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, Any]:
        out = self._multi_metrics(golds, preds) if self.cfg.multi_label else self._single_metrics(golds, preds)
        out["valid_rate"] = example_rate(p is not None for p in preds)
        return out

    def _single_metrics(self, golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, Any]:
        from sklearn.metrics import f1_score

        preds_ = [p if p is not None else "<invalid>" for p in preds]
        labels = sorted(set(golds))
        per_label = f1_score(golds, preds_, labels=labels, average=None, zero_division=0)
        out: dict[str, Any] = {
            "accuracy": example_rate(g == p for g, p in zip(golds, preds_)),
            "macro_f1": float(per_label.mean()) if len(labels) else 0.0,
            "per_label_f1": {label: float(f) for label, f in zip(labels, per_label)},
        }
        none = self.cfg.none_label
        if none:
            in_scope = [(g, p) for g, p in zip(golds, preds_) if g != none]
            flagged = [g for g, p in zip(golds, preds_) if p == none]
            out |= {"in_scope_accuracy": example_rate(g == p for g, p in in_scope),
                    "oos_recall": example_rate(p == none for g, p in zip(golds, preds_) if g == none),
                    "oos_precision": example_rate(g == none for g in flagged)}
        return out

    def _multi_metrics(self, golds: Sequence[str], preds: Sequence[str | None]) -> dict[str, Any]:
        from sklearn.metrics import f1_score
        from sklearn.preprocessing import MultiLabelBinarizer

        binarizer = MultiLabelBinarizer(classes=sorted(self.labels))
        y_true = binarizer.fit_transform([_as_set(g) for g in golds])
        y_pred = binarizer.transform([_as_set(p) for p in preds])
        per_label = f1_score(y_true, y_pred, average=None, zero_division=0)
        present = y_true.sum(axis=0) > 0
        return {
            "exact_match": example_rate(g == p for g, p in zip(golds, preds)),
            "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
            "macro_f1": float(per_label[present].mean()) if present.any() else 0.0,
            "per_label_f1": {label: float(f) for label, f, seen in zip(binarizer.classes_, per_label, present) if seen},
        }


    # -- synthetic data ---------------------------------------------------------------------------
    def synth(self) -> SynthHooks:
        return SynthHooks(request=self._synth_request, parse_row=self._synth_row, answer_row=_synth_answer_row,
                          filters=("length", "refusal", "pii", "copy", "near_duplicate", "probe", "judge"))

    def _synth_request(self, ask: SynthAsk) -> list[Message]:
        """Ask for ``ask.n`` examples of one label (fixed first: a teacher asked for "an example" drifts to easy labels)."""
        system = (
            "You write realistic, varied examples for training a text classifier.\n"
            f"Task: {self.cfg.instruction}\nAll labels: {', '.join(self.labels)}.\n"
            "Rules: write what a real person would write; vary wording, length and scenario; never copy or lightly edit "
            "the examples shown; no real names, e-mail addresses, phone numbers or account numbers; keep the label's meaning exactly.\n"
            f"Answer with JSON only, in this shape: {SYNTH_SHAPE}"
        )
        parts = [f"Label: {ask.label}"]
        if ask.attributes:
            parts.append("Scenario: " + "; ".join(f"{k} = {v}" for k, v in ask.attributes.items()))
        if ask.exemplars:
            parts.append("Real examples with this label:\n" + "\n".join(f"- {r['text']}" for r in ask.exemplars))
        parts.append(f'Write {ask.n} new, different example(s) with label "{ask.label}". JSON only.')
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]

    def _synth_row(self, item: dict[str, Any]) -> tuple[Row | None, str | None]:
        """``({"text", "label"}, None)`` or ``(None, why)``: the item checked by this task's row schema, under the
        fixed keys of ``SYNTH_SHAPE`` (whatever the recipe's field names are)."""
        example, problems = self.normalize(item, self.cfg.model_copy(update={"text_field": "text", "label_field": "label"}))
        if example is None:
            return None, "; ".join(f"{reason} (got {str(got)[:60]})" for reason, got in problems)
        return {"text": " ".join(example["text"].split()), "label": example["label"]}, None


SYNTH_SHAPE = '{"examples": [{"text": "...", "label": "..."}]}'


def _synth_answer_row(row: Row) -> dict[str, Any]:
    return {"text": row["text"], "label": row["label"]}


def _as_set(answer: str | None) -> set[str]:
    return set(answer.split(JOIN)) if answer else set()


def _labels_of(row: dict[str, Any], cfg: ClassifyConfig, problems: RowProblems) -> list[str]:
    """The row's label(s), canonical (stripped; sorted and de-duplicated with multi_label)."""
    field = cfg.label_field
    if field not in row:
        problems.append((f"missing field {field!r}", f"keys {sorted(row)}"))
        return []
    value = row[field]
    if cfg.multi_label and isinstance(value, str):
        value = value.split(cfg.label_separator)
    if cfg.multi_label and isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            problems.append((f"field {field!r} must hold strings", value))
            return []
        labels = sorted({v.strip() for v in value if v.strip()})
        if not labels:
            problems.append((f"field {field!r} has no label", row[field]))
        elif len(labels) > cfg.max_labels:
            problems.append((f"{len(labels)} labels, more than task.max_labels={cfg.max_labels}", row[field]))
        return labels
    if not isinstance(value, str):
        problems.append((f"field {field!r} is not a string", value))
    elif not value.strip():
        problems.append((f"field {field!r} is empty", value))
    else:
        return [value.strip()]
    return []
