"""Task ``generate``: one text in, free text out (a one-sentence summary, a rewrite, an answer).

Rows are normalised to ``{"text": str, "target": str, "references": [str, ...]}``: the target field
may hold one reference or a list of them (SciTLDR's test set has several per abstract); training
uses the first, scoring takes the best match over all of them. Metrics: ROUGE-L F1, and ROUGE-1/-2 F1
beside it, computed by Google's ``rouge-score`` with Porter stemming (as published SciTLDR results are),
best reference per example and per ROUGE type, averaged; mean words of the predictions and of the
references and their ratio, and the share of non-empty answers (valid_rate); ROUGE-L is the main metric.
Decoding: free generation of up to ``max_new_tokens``. Synth: a request shows real (text, target) pairs and
asks for ``n`` new pairs, each ``{"text", "target"}`` with one target string, checked by this task's row schema;
all rows form one stratum (there are no labels to plan by).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

import microtune.tasks.base as base
from microtune.tasks.base import DecoderSpec, GeneratedSection, Row, RowProblems, TaskBase


class GenerateConfig(GeneratedSection):
    """Task `generate`: text → free text (a summary, a rewrite, an answer)."""

    type: Literal["generate"] = base.type_field("generate")


class GenerateTask(TaskBase):
    name = "generate"
    config = GenerateConfig
    has_labels = False
    baselines = (*base.PROMPTED, "lead")  # the input's first sentence as the answer (evaluation/lead.py)

    cfg: GenerateConfig

    # -- rows -------------------------------------------------------------------------------------
    @staticmethod
    def normalize(row: dict[str, Any], cfg: GenerateConfig) -> tuple[Row | None, RowProblems]:
        text, problems = base.check_text(row, cfg.text_field)
        refs = _references(row, cfg.target_field, problems)
        return (None, problems) if problems else ({"text": text, "target": refs[0], "references": refs}, [])

    @staticmethod
    def label_of(example: dict[str, Any]) -> None:
        return None

    # -- prompts ----------------------------------------------------------------------------------
    def messages(self, example: dict[str, Any], *, label_list: bool = False,
                 shots: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.cfg.instruction}, *base.shot_turns(shots, self.target),
                {"role": "user", "content": example["text"]}]

    def target(self, example: dict[str, Any]) -> str:
        return example["target"]

    def decoder(self) -> DecoderSpec:
        return DecoderSpec(kind="free", max_new_tokens=self.cfg.max_new_tokens)

    def gold(self, example: dict[str, Any]) -> list[str]:
        return example["references"]

    def parse(self, output: str) -> str | None:
        text = output.strip()
        return text or None

    # -- metrics ----------------------------------------------------------------------------------
    @classmethod
    def metric_names(cls, cfg: GenerateConfig, every: bool = False) -> list[str]:
        return ["rouge_l", "length_ratio"] + (["rouge_1", "rouge_2", "pred_words_mean", "ref_words_mean", "valid_rate"] if every else [])

    def example_scores(self, golds: Sequence[list[str]], preds: Sequence[str | None]) -> list[float]:
        """Per-row ROUGE-L (best reference): what the gate's paired bootstrap and the eval's paired tests compare."""
        return [best_rouge(p or "", refs)[2] for refs, p in zip(golds, preds)]

    def metrics(self, golds: Sequence[list[str]], preds: Sequence[str | None]) -> dict[str, Any]:
        best = [best_rouge(p or "", refs) for refs, p in zip(golds, preds)]
        pred_words = [len(_words(p or "")) for p in preds]
        ref_words = [len(_words(refs[0])) for refs in golds]
        mean_pred, mean_ref = _mean(pred_words), _mean(ref_words)
        return {"rouge_l": _mean([b[2] for b in best]), "rouge_1": _mean([b[0] for b in best]), "rouge_2": _mean([b[1] for b in best]),
                "pred_words_mean": mean_pred, "ref_words_mean": mean_ref, "length_ratio": mean_pred / mean_ref if mean_ref else 0.0,
                "valid_rate": base.example_rate(p is not None for p in preds)}

    # -- synthetic data ---------------------------------------------------------------------------
    def synth(self) -> base.SynthHooks:
        """One stratum for every row: a generate task has no labels, and its inputs have no fields to plan by."""
        return base.SynthHooks(request=self._synth_request, parse_row=self._synth_row, answer_row=_synth_answer_row,
                               filters=("length", "refusal", "pii", "copy", "near_duplicate", "target_length", "target_copy"),
                               stratum=_one_stratum, strata="one stratum (all rows)")

    def _synth_request(self, ask: base.SynthAsk) -> list[base.Message]:
        """Ask for ``ask.n`` new (text, target) pairs like the real pairs shown."""
        system = (
            "You write realistic, varied examples for training a model that turns an input text into an output text.\n"
            f"Task: {self.cfg.instruction}\n"
            "Rules: write inputs like the real ones and outputs exactly as the task asks, as long as the real outputs are "
            "relative to their inputs; vary wording, topic and scenario; never copy or lightly edit the examples shown; never "
            "copy the input as the output; no real names, e-mail addresses, phone numbers or account numbers.\n"
            f"Answer with JSON only, in this shape: {SYNTH_SHAPE}"
        )
        parts = []
        if ask.attributes:
            parts.append("Scenario: " + "; ".join(f"{k} = {v}" for k, v in ask.attributes.items()))
        if ask.exemplars:
            parts.append("Real examples:\n" + "\n".join(json.dumps(_synth_answer_row(r), ensure_ascii=False) for r in ask.exemplars))
        parts.append(f"Write {ask.n} new, different example(s). JSON only.")
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]

    def _synth_row(self, item: dict[str, Any]) -> tuple[Row | None, str | None]:
        """``({"text", "target", "references"}, None)`` or ``(None, why)``: the item checked by this task's row schema
        under the fixed keys of ``SYNTH_SHAPE``; a synthetic row has one target (no list of references)."""
        if "target" in item and not isinstance(item["target"], str):
            return None, f"field 'target' must be one string (got {str(item['target'])[:60]})"
        example, problems = self.normalize(item, self.cfg.model_copy(update={"text_field": "text", "target_field": "target"}))
        if example is None:
            return None, "; ".join(f"{reason} (got {str(got)[:60]})" for reason, got in problems)
        target = " ".join(example["target"].split())
        return {"text": " ".join(example["text"].split()), "target": target, "references": [target]}, None


SYNTH_SHAPE = '{"examples": [{"text": "...", "target": "..."}]}'
ONE_STRATUM = "all"


def _one_stratum(example: Row) -> str:
    return ONE_STRATUM


def _synth_answer_row(row: Row) -> dict[str, Any]:
    return {"text": row["text"], "target": row["target"]}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")  # rouge-score's names; the metrics are rouge_1, rouge_2, rouge_l


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    """One shared scorer; rouge-score imports nltk (seconds), so only a generate task that is scored pays for it."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


@functools.lru_cache(maxsize=1 << 16)
def rouge(prediction: str, reference: str) -> tuple[float, float, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 of one prediction against one reference, as ``rouge-score`` computes them:
    lower-cased ASCII letter/digit tokens, Porter-stemmed (words over 3 letters), the scoring of published SciTLDR
    results. Cached: the bootstrap rescores the same (prediction, reference) pairs on every resample."""
    scores = _scorer().score(reference, prediction)
    return tuple(float(scores[t].fmeasure) for t in ROUGE_TYPES)  # type: ignore[return-value]


def best_rouge(prediction: str, references: Sequence[str]) -> tuple[float, float, float]:
    """The best of each ROUGE type over the references, taken per type (rouge-score's ``score_multi`` does the same)."""
    per_ref = [rouge(prediction, r) for r in references]
    return tuple(max(s[i] for s in per_ref) for i in range(len(ROUGE_TYPES))) if per_ref else (0.0, 0.0, 0.0)  # type: ignore[return-value]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (rouge-score, stemmed): the generate task's main metric for one pair."""
    return rouge(prediction, reference)[2]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _references(row: dict[str, Any], field: str, problems: RowProblems) -> list[str]:
    if field not in row:
        problems.append((f"missing field {field!r}", f"keys {sorted(row)}"))
        return []
    value = row[field]
    refs = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if refs is None or not all(isinstance(r, str) for r in refs):
        problems.append((f"field {field!r} must be a string or a list of strings", value))
        return []
    refs = [r.strip() for r in refs if r.strip()]
    if not refs:
        problems.append((f"field {field!r} is empty", value))
    return refs
