"""The filter cascade: each stage keeps some rows and rejects the others with a reason code.

    cascade = Cascade(recipe.synth.filters, strata, pool_rows, all_real_rows, stages=hooks.filters)
    kept = cascade.run(candidates)             # candidates already passed schema/label validity
    cascade.rejected, cascade.counts           # rows with reason + detail; {stage: {stratum: n}}

Order (cheap and certain first): length within the real rows' per-label band → refusal/boilerplate →
PII (e-mail, phone, card numbers with a valid Luhn digit, IBAN with a valid mod-97 check, SSN-like)
→ copy of a real row (ROUGE-L F1 on words, against train, valid *and* test) → near-duplicate within
the synthetic set (rapidfuzz token-sort ratio, first one kept) → the task's own content checks →
label verification (a TF-IDF + logistic regression probe trained on the real rows). The optional LLM
judge runs after these, in the stage, because it needs the teacher endpoint. Each kept row carries
its scores (``row["scores"]``). A task's synth hooks name the stages that apply to it:

- classify: all of the generic stages, then the probe (and the judge);
- extract: the generic stages on the text, then ``grounding``: every non-null field value (each item
  of a list) occurs in the text, compared after normalisation (case, punctuation, articles, spacing);
- generate: the generic stages on the input text, then ``target_length`` (the target's words per input
  word within the real pairs' band, widened by ``length_slack`` like the length band) and
  ``target_copy`` (the target is not a near-copy of its input — ROUGE-L ≥ ``copy_threshold`` and closer
  than any real pair — nor of a real target, ROUGE-L ≥ ``copy_threshold``).

Rows are counted per stratum: the label, or for a task without labels its plan's stratum (``plan.stratum_of``);
there the length band is that of all real rows, since a stratum may hold only a few.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from microtune.config import SynthFilterConfig
from microtune.data.dataset import normalize_text
from microtune.synthesis.plan import stratum_of

Row = dict[str, Any]
STAGES = ("schema", "label", "stratum", "length", "refusal", "pii", "copy", "near_duplicate", "grounding", "target_length",
          "target_copy", "probe", "judge")
# the stages `Cascade.run` runs, in this order
CASCADE = ("length", "refusal", "pii", "copy", "near_duplicate", "grounding", "target_length", "target_copy", "probe")
LABELLED = ("length", "refusal", "pii", "copy", "near_duplicate", "probe")  # the default: the stages of a task with labels

_REFUSAL = [
    r"\bas an ai\b", r"\b(?:ai|large) language model\b", r"\bi(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bi (?:can(?:no|')t|won't|will not) (?:help|assist|provide|create|write|generate|comply)\b",
    r"^(?:sure|certainly|of course|absolutely)\b[,!.]", r"^here (?:is|are)\b", r"\bexample\s*#?\d*\s*:", r"^(?:text|label)\s*:",
    r"\blorem ipsum\b", r"\[(?:name|insert|your|customer|company|product)[^\]]*\]", r"\{\{?\s*\w+\s*\}?\}", r"<(?:name|insert)[^>]*>",
]


def length_band(words: list[int], slack: float) -> tuple[int, int]:
    lo, hi = np.percentile(words, [5, 95]) if words else (1, 10**6)
    return max(1, int(np.floor(lo * (1 - slack)))), int(np.ceil(hi * (1 + slack)))


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    moved = s[4:] + s[:4]
    return 15 <= len(s) <= 34 and int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


_PII: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), lambda m: True),
    ("card", re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"), lambda m: luhn_ok(re.sub(r"\D", "", m))),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), iban_ok),
    ("ssn", re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"), lambda m: True),
    ("phone", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\w)"), lambda m: True),
    ("phone", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\d{2,4}){3,5}(?!\w)"), lambda m: True),
]


def find_pii(text: str) -> str | None:
    """The kind of the first personal datum found (``email``, ``card``, ``iban``, ``ssn``, ``phone``), else None."""
    for kind, pattern, valid in _PII:
        if any(valid(m.group(0)) for m in pattern.finditer(text)):
            return kind
    return None


def text_features() -> Any:
    """Word 1-2-grams and character 2-5-grams, TF-IDF: the features of the probe and the fidelity classifiers."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    return FeatureUnion([("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")),
                         ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=1))])


def probe(rows: list[Row], seed: int) -> Any:
    """A label classifier: TF-IDF + logistic regression, fitted by SGD (lbfgs is slow with tens of labels)."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(text_features(), SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed))
    return model.fit([r["text"] for r in rows], [r["label"] for r in rows])


def rouge_l(candidates: list[list[str]], references: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Best ROUGE-L F1 (longest common word subsequence) of each candidate against the references, and its index."""
    from rapidfuzz.distance import LCSseq
    from rapidfuzz.process import cdist

    best, where = np.zeros(len(candidates)), np.zeros(len(candidates), dtype=int)
    ref_len = np.array([len(r) for r in references], dtype=float)
    for start in range(0, len(candidates), 512):  # chunks bound the LCS matrix's memory
        chunk = candidates[start: start + 512]
        lcs = cdist(chunk, references, scorer=LCSseq.similarity, workers=1).astype(float)
        f1 = 2 * lcs / (np.array([len(c) for c in chunk], dtype=float)[:, None] + ref_len[None, :]).clip(min=1)
        best[start: start + len(chunk)], where[start: start + len(chunk)] = f1.max(axis=1), f1.argmax(axis=1)
    return best, where


class Cascade:
    def __init__(self, cfg: SynthFilterConfig, labels: list[str], pool: list[Row], real: list[Row], seed: int = 13,
                 stages: Sequence[str] = LABELLED, pooled_band: bool = False):
        """``labels``: the strata (the task's labels, where it has them); ``stages``: the filters that apply to the task's
        rows (its synth hooks say), the others are skipped; ``pooled_band``: one length band from every real row instead of
        one per stratum (tasks without labels: a stratum may hold a single real row)."""
        self.cfg, self.labels, self.pool, self.real, self.seed = cfg, labels, pool, real, seed
        self.stages = set(stages)
        self.rejected: list[Row] = []
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)  # reason -> stratum -> rejected rows
        self.entered: dict[str, int] = {}
        words: dict[str, list[int]] = defaultdict(list)
        for row in pool:
            words[stratum_of(row)].append(len(row["text"].split()))
        if pooled_band:
            band = length_band([n for group in words.values() for n in group], cfg.length_slack)
            self.bands = dict.fromkeys(labels, band)
        else:
            self.bands = {label: length_band(words.get(label, []), cfg.length_slack) for label in labels}
        self.band_of = "the real rows" if pooled_band else None
        # a boilerplate pattern that real rows use is the domain's own style, not the generator's
        self.refusal = [p for p in (re.compile(x, re.IGNORECASE) for x in _REFUSAL) if not _common(p, pool)]

    def reject(self, row: Row, reason: str, detail: str) -> None:
        self.rejected.append({**row, "reason": reason, "detail": detail})
        self.counts[reason][stratum_of(row)] += 1

    def run(self, rows: list[Row]) -> list[Row]:
        for name, stage in (("length", self._length), ("refusal", self._refusal), ("pii", self._pii), ("copy", self._copy),
                            ("near_duplicate", self._near_dup), ("grounding", self._grounding),
                            ("target_length", self._target_length), ("target_copy", self._target_copy), ("probe", self._probe)):
            if name not in self.stages:
                continue
            self.entered[name] = self.entered.get(name, 0) + len(rows)
            rows = stage(rows)
        return rows

    def _each(self, rows: Iterable[Row], check: Callable[[Row], tuple[str, str] | None]) -> list[Row]:
        kept = []
        for row in rows:
            found = check(row)
            if found:
                self.reject(row, *found)
            else:
                kept.append(row)
        return kept

    def _length(self, rows: list[Row]) -> list[Row]:
        def check(row: Row) -> tuple[str, str] | None:
            n, (lo, hi) = len(row["text"].split()), self.bands[stratum_of(row)]
            row["scores"]["words"] = n
            of = self.band_of or repr(stratum_of(row))
            return None if lo <= n <= hi else ("length", f"{n} words, outside the real band [{lo}, {hi}] of {of}")
        return self._each(rows, check)

    def _refusal(self, rows: list[Row]) -> list[Row]:
        def check(row: Row) -> tuple[str, str] | None:
            hit = next((p.pattern for p in self.refusal if p.search(row["text"])), None)
            return ("refusal", f"matches {hit}") if hit else None
        return self._each(rows, check)

    def _pii(self, rows: list[Row]) -> list[Row]:
        if not self.cfg.pii:
            return rows
        return self._each(rows, lambda row: ("pii", f"contains a {kind}") if (kind := find_pii(row["text"])) else None)

    def _copy(self, rows: list[Row]) -> list[Row]:
        if not rows or not self.real:
            return rows
        best, where = rouge_l([normalize_text(r["text"]).split() for r in rows], [normalize_text(r["text"]).split() for r in self.real])
        for row, score, idx in zip(rows, best, where):
            row["scores"]["copy_rouge_l"] = round(float(score), 4)
            row["scores"]["nearest_real"] = self.real[idx]["source"]
        def check(row: Row) -> tuple[str, str] | None:
            score = row["scores"]["copy_rouge_l"]
            return ("copy", f"ROUGE-L {score:.2f} with real row {row['scores']['nearest_real']}") if score >= self.cfg.copy_threshold else None
        return self._each(rows, check)

    def _near_dup(self, rows: list[Row]) -> list[Row]:
        from rapidfuzz import fuzz, process

        cutoff, kept_texts = self.cfg.near_dup_threshold * 100, []

        def check(row: Row) -> tuple[str, str] | None:
            text = normalize_text(row["text"])
            hit = process.extractOne(text, kept_texts, scorer=fuzz.token_sort_ratio, score_cutoff=cutoff) if kept_texts else None
            if hit:
                return "near_duplicate", f"similarity {hit[1] / 100:.2f} with kept synthetic row {hit[0]!r}"
            kept_texts.append(text)
            return None
        return self._each(rows, check)

    def _grounding(self, rows: list[Row]) -> list[Row]:
        """extract: a value the text does not contain teaches the model to invent values."""
        def check(row: Row) -> tuple[str, str] | None:
            text, n = f" {loose(row['text'])} ", 0
            for field, value in row["output"].items():
                for item in [] if value is None else [value] if isinstance(value, str) else value:
                    n += 1
                    if not loose(item) or f" {loose(item)} " not in text:
                        return "grounding", f"field {field!r} value {item!r} does not occur in the text"
            row["scores"]["grounded_values"] = n
            return None
        return self._each(rows, check)

    def _target_length(self, rows: list[Row]) -> list[Row]:
        """generate: the target's length relative to its input, within the real pairs' spread."""
        ratios = [_words(r["target"]) / max(_words(r["text"]), 1) for r in self.pool]
        lo, hi = np.percentile(ratios, [5, 95]) if ratios else (0.0, float("inf"))
        lo, hi = lo * (1 - self.cfg.length_slack), hi * (1 + self.cfg.length_slack)

        def check(row: Row) -> tuple[str, str] | None:
            t, x = _words(row["target"]), _words(row["text"])
            ratio = t / max(x, 1)
            row["scores"]["target_ratio"] = round(ratio, 4)
            return None if t and lo <= ratio <= hi else \
                ("target_length", f"target of {t} words for an input of {x}: ratio {ratio:.2f}, outside the real band [{lo:.2f}, {hi:.2f}]")
        return self._each(rows, check)

    def _target_copy(self, rows: list[Row]) -> list[Row]:
        """generate: a target that repeats its input, or a real target, teaches copying rather than the task."""
        if not rows:
            return rows
        own = [_similarity(r["text"], r["target"]) for r in self.pool]
        bar = max([self.cfg.copy_threshold, *own])  # a rewrite task's real pairs may be close: never stricter than they are
        real = [r for r in self.real if r.get("target")]
        best, where = rouge_l([normalize_text(r["target"]).split() for r in rows], [normalize_text(r["target"]).split() for r in real]) \
            if real else (np.zeros(len(rows)), np.zeros(len(rows), dtype=int))

        def check(row: Row, score: float, idx: int) -> tuple[str, str] | None:
            to_input = _similarity(row["text"], row["target"])
            row["scores"]["target_input_rouge_l"], row["scores"]["target_copy_rouge_l"] = round(to_input, 4), round(float(score), 4)
            if to_input >= bar and (to_input > max(own, default=0.0) or to_input >= 1.0):
                return "target_copy", f"the target is a near-copy of its input (ROUGE-L {to_input:.2f}, real pairs at most " \
                                      f"{max(own, default=0.0):.2f})"
            if real and score >= self.cfg.copy_threshold:
                return "target_copy", f"the target is a near-copy of real row {real[idx]['source']}'s target (ROUGE-L {score:.2f})"
            return None
        checks = {id(row): check(row, float(score), int(idx)) for row, score, idx in zip(rows, best, where)}
        return self._each(rows, lambda row: checks[id(row)])

    def _probe(self, rows: list[Row]) -> list[Row]:
        known = {r["label"] for r in self.pool}
        if self.cfg.label_check is False or not rows or len(known) < 2:
            return rows
        model = probe(self.pool, self.seed)
        classes = list(model.classes_)
        proba = model.predict_proba([r["text"] for r in rows])
        k = min(self.cfg.probe_top_k, len(classes))
        for row, p in zip(rows, proba):
            top = [classes[i] for i in np.argsort(-p)[:k]]
            row["scores"]["probe_prob"] = round(float(p[classes.index(row["label"])]), 4) if row["label"] in known else None
            row["scores"]["probe_top"] = top[0]
            row["_probe_ok"] = row["label"] not in known or row["label"] in top  # a label without real rows cannot be checked
        kept = self._each(rows, lambda row: None if row["_probe_ok"] else
                          ("probe", f"probe trained on real rows puts {row['label']!r} outside its top {k} (top: {row['scores']['probe_top']!r})"))
        for row in rows:
            row.pop("_probe_ok", None)
        return kept


def loose(text: str) -> str:
    """Case, punctuation, articles and spacing folded: how an extracted value is looked for in its text."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _words(text: str) -> int:
    return len(text.split())


def _similarity(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over normalised words."""
    best, _ = rouge_l([normalize_text(a).split()], [normalize_text(b).split()])
    return float(best[0])


def _common(pattern: re.Pattern[str], rows: list[Row], share: float = 0.01) -> bool:
    hits = sum(1 for r in rows if pattern.search(r["text"]))
    return hits > 0 and hits >= share * len(rows)


def judge_messages(instruction: str, labels: list[str], row: Row) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"You check labels of a text classifier's training data.\nTask: {instruction}\n"
             f"Labels: {', '.join(labels)}.\nAnswer with one word: yes or no."},
            {"role": "user", "content": f"Text: {row['text']}\nProposed label: {row['label']}\nIs the proposed label right for the text?"}]


def judge_says_no(content: str | None) -> bool | None:
    """True for a `no`, False for a `yes`, None when the judge answered neither."""
    word = re.match(r"\W*(\w+)", content or "")
    first = word.group(1).lower() if word else ""
    return {"no": True, "yes": False}.get(first)
