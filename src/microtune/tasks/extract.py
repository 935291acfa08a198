"""Task ``extract``: one text in, a JSON object with the recipe's ``fields`` out (e.g. drug, effect, dosage).

Rows are normalised to ``{"text": str, "output": {field: value}}`` where every field of the recipe is
present and a value is a string, a list of strings, or null (the text does not say). The completion is
the object as compact JSON in field order, so the model learns one canonical form. Prompted baselines
also get the field list with descriptions. Parsing takes the first JSON object in the model's output
(prose or code fences around it are tolerated); anything else counts as invalid.

Metrics: JSON validity rate; per field precision/recall/F1 over the set of values, by exact match and
after normalisation (case, punctuation, articles, spacing); micro-F1 (all fields pooled) and macro-F1
(mean over fields). An example's score for paired tests is its micro-F1, the main metric.
Decoding: generation of up to ``max_new_tokens`` constrained to the answer's JSON schema (every field, in
order, nothing else; each value a string, a list of strings or null), so local systems always answer a
valid object; endpoints' answers are parsed as above. Synth: a request shows real rows (text and object) and
asks for ``n`` new texts with their objects, all with the same fields filled (the plan's stratum: which fields
are non-null); each item is ``{"text", "output": {field: value}}``, checked by this task's row schema with
exactly the recipe's fields.
"""
from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from microtune.tasks.base import (
    DecoderSpec,
    GeneratedSection,
    Message,
    Row,
    RowProblems,
    SynthAsk,
    SynthHooks,
    TaskBase,
    check_text,
    example_rate,
    shot_turns,
    type_field,
)

Value = str | list[str] | None


class ExtractConfig(GeneratedSection):
    """Task `extract`: text → a JSON object with the recipe's `fields`."""

    type: Literal["extract"] = type_field("extract")
    fields: dict[str, str] | None = Field(
        None, description="extract: output field name → what it holds (shown to prompted baselines). Values are a "
        "string, a list of strings, or null."
    )

    @model_validator(mode="after")
    def _fields_given(self) -> ExtractConfig:
        if not self.fields:
            raise ValueError("task.type extract needs task.fields (name: description of each output field)")
        return self


class ExtractTask(TaskBase):
    name = "extract"
    config = ExtractConfig
    has_labels = False

    def __init__(self, cfg: ExtractConfig, labels: Sequence[str] = ()):
        super().__init__(cfg, labels)
        self.cfg: ExtractConfig = cfg
        self.fields = list(cfg.fields or {})

    # -- rows -------------------------------------------------------------------------------------
    @staticmethod
    def normalize(row: dict[str, Any], cfg: ExtractConfig) -> tuple[Row | None, RowProblems]:
        text, problems = check_text(row, cfg.text_field)
        output = _output_of(row, cfg, problems)
        return (None, problems) if problems else ({"text": text, "output": output}, [])

    @staticmethod
    def label_of(example: dict[str, Any]) -> None:
        return None

    # -- prompts ----------------------------------------------------------------------------------
    def messages(self, example: dict[str, Any], *, label_list: bool = False,
                 shots: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
        system = self.cfg.instruction
        if label_list:
            keys = "; ".join(f'"{name}": {desc}' for name, desc in (self.cfg.fields or {}).items())
            system += ("\nAnswer with one JSON object with exactly these keys and nothing else: " + keys +
                       ". Copy the words from the text; use a list for several values and null when the text does not say.")
        return [{"role": "system", "content": system}, *shot_turns(shots, self.target),
                {"role": "user", "content": example["text"]}]

    def target(self, example: dict[str, Any]) -> str:
        return json.dumps({f: example["output"].get(f) for f in self.fields}, ensure_ascii=False)

    def decoder(self) -> DecoderSpec:
        """A JSON object following ``answer_schema``: local decoding is grammar-constrained to it."""
        return DecoderSpec(kind="json", schema=self.answer_schema(), max_new_tokens=self.cfg.max_new_tokens)

    def answer_schema(self) -> dict[str, Any]:
        """JSON schema of the answer: exactly the recipe's fields (all required, no others, in recipe order: the
        order the constrained decoder writes them), each a string, a list of strings or null."""
        value = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
        return {"type": "object", "additionalProperties": False, "required": self.fields,
                "properties": {name: {**value, "description": desc} for name, desc in (self.cfg.fields or {}).items()}}

    def gold(self, example: dict[str, Any]) -> dict[str, Value]:
        return example["output"]

    def parse(self, output: str) -> dict[str, Value] | None:
        """The first JSON object in ``output`` restricted to the recipe's fields, or ``None`` if there is none."""
        obj = _first_object(output)
        if obj is None:
            return None
        return {f: _coerce(obj.get(f)) for f in self.fields}

    # -- metrics ----------------------------------------------------------------------------------
    @classmethod
    def metric_names(cls, cfg: ExtractConfig, every: bool = False) -> list[str]:
        return ["micro_f1", "micro_f1_normalized", "valid_rate"] + (["macro_f1"] if every else [])

    def example_scores(self, golds: Sequence[dict[str, Value]], preds: Sequence[dict[str, Value] | None]) -> list[float]:
        scores = []
        for gold, pred in zip(golds, preds):
            tp, fp, fn = _pooled(self.fields, [gold], [pred], exact=True)
            scores.append(1.0 if tp + fp + fn == 0 else _f1(tp, fp, fn))
        return scores

    def metrics(self, golds: Sequence[dict[str, Value]], preds: Sequence[dict[str, Value] | None]) -> dict[str, Any]:
        per_field: dict[str, dict[str, float]] = {}
        for f in self.fields:
            tp, fp, fn = _pooled([f], golds, preds, exact=True)
            ntp, nfp, nfn = _pooled([f], golds, preds, exact=False)
            per_field[f] = {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _f1(tp, fp, fn),
                            "f1_normalized": _f1(ntp, nfp, nfn), "support": tp + fn}
        return {
            "micro_f1": _f1(*_pooled(self.fields, golds, preds, exact=True)),
            "micro_f1_normalized": _f1(*_pooled(self.fields, golds, preds, exact=False)),
            "macro_f1": sum(v["f1"] for v in per_field.values()) / max(len(per_field), 1),
            "valid_rate": example_rate(p is not None for p in preds),
            "per_field": per_field,
        }

    # -- synthetic data ---------------------------------------------------------------------------
    def synth(self) -> SynthHooks:
        """Rows are planned per filled-field set, so the synthetic rows keep the real rows' mix of null fields."""
        return SynthHooks(request=self._synth_request, parse_row=self._synth_row, answer_row=self._synth_answer_row,
                          filters=("length", "refusal", "pii", "copy", "near_duplicate", "grounding"),
                          stratum=self.filled, strata="filled fields")

    def filled(self, example: Row) -> str:
        """The example's stratum: the names of its non-null fields, in recipe order (``(no fields)`` when all are null)."""
        names = [f for f in self.fields if example["output"].get(f) is not None]
        return FILLED_SEP.join(names) if names else NO_FIELDS

    def _synth_request(self, ask: SynthAsk) -> list[Message]:
        """Ask for ``ask.n`` texts whose objects fill exactly the fields of the stratum (fixed first, like classify's label)."""
        described = "\n".join(f"- {name}: {desc}" for name, desc in (self.cfg.fields or {}).items())
        system = (
            "You write realistic, varied examples for training an information extraction model.\n"
            f"Task: {self.cfg.instruction}\nFields of the JSON object:\n{described}\n"
            "Rules: write what a real text of this kind looks like; vary wording, length, values and scenario; never copy or "
            "lightly edit the examples shown; no real names, e-mail addresses, phone numbers or account numbers; every value "
            "is copied word for word from your text; a field the text does not mention is null; several values go in a list.\n"
            f"Answer with JSON only, in this shape: {self._synth_shape()}"
        )
        filled = [] if ask.label == NO_FIELDS else ask.label.split(FILLED_SEP)
        parts = [f"Filled fields: {', '.join(filled) or 'none'}",
                 f"Null fields: {', '.join(f for f in self.fields if f not in filled) or 'none'}"]
        if ask.attributes:
            parts.append("Scenario: " + "; ".join(f"{k} = {v}" for k, v in ask.attributes.items()))
        if ask.exemplars:
            parts.append("Real examples:\n" + "\n".join(json.dumps(self._synth_answer_row(r), ensure_ascii=False) for r in ask.exemplars))
        parts.append(f"Write {ask.n} new, different example(s) whose objects fill exactly these fields. JSON only.")
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(parts)}]

    def _synth_shape(self) -> str:
        return json.dumps({"examples": [{"text": "...", "output": dict.fromkeys(self.fields, "...")}]})

    def _synth_row(self, item: dict[str, Any]) -> tuple[Row | None, str | None]:
        """``({"text", "output"}, None)`` or ``(None, why)``: the item checked by this task's row schema under the fixed keys
        of the synth shape, its object with exactly the recipe's fields (a missing key is an error here, not a null)."""
        output = item.get("output")
        if isinstance(output, str):  # the object as JSON text: the row schema reads it the same way
            try:
                output = json.loads(output)
            except json.JSONDecodeError:
                pass
        if isinstance(output, dict) and set(output) != set(self.fields):
            missing, extra = [f for f in self.fields if f not in output], sorted(set(output) - set(self.fields))
            return None, (f"the object's keys must be exactly {', '.join(self.fields)}" + (f"; missing {missing}" if missing else "")
                          + (f"; unknown {extra}" if extra else ""))
        example, problems = self.normalize({**item, "output": output}, self.cfg.model_copy(update={"text_field": "text",
                                                                                                  "target_field": "output"}))
        if example is None:
            return None, "; ".join(f"{reason} (got {str(got)[:60]})" for reason, got in problems)
        return {"text": " ".join(example["text"].split()), "output": example["output"]}, None

    def _synth_answer_row(self, row: Row) -> dict[str, Any]:
        return {"text": row["text"], "output": {f: row["output"].get(f) for f in self.fields}}


FILLED_SEP = " + "  # joins the filled field names of a synth stratum
NO_FIELDS = "(no fields)"  # the stratum of rows whose every field is null


def _output_of(row: dict[str, Any], cfg: ExtractConfig, problems: RowProblems) -> dict[str, Value]:
    field, fields = cfg.target_field, list(cfg.fields or {})
    if field not in row:
        problems.append((f"missing field {field!r}", f"keys {sorted(row)}"))
        return {}
    value = row[field]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            problems.append((f"field {field!r} is not a JSON object ({exc.msg})", value))
            return {}
    if not isinstance(value, dict):
        problems.append((f"field {field!r} is not a JSON object", value))
        return {}
    for key in value:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            problems.append((f"unknown output field {key!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
                             f" (task.fields: {', '.join(fields)})", value[key]))
    out = {}
    for f in fields:
        v = value.get(f)
        if not (v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            problems.append((f"output field {f!r} must be a string, a list of strings or null", v))
        out[f] = v if v not in ("", []) else None
    return out


def _first_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _coerce(value: Any) -> Value:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, list):
        return [str(v) for v in value if v not in (None, "")] or None
    return str(value)


def _values(value: Value, exact: bool) -> set[str]:
    items = [] if value is None else [value] if isinstance(value, str) else value
    return {v.strip() if exact else _norm(v) for v in items} - {""}


def _norm(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _pooled(fields: Sequence[str], golds: Sequence[dict[str, Value]], preds: Sequence[dict[str, Value] | None],
            exact: bool) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) over value sets; an invalid prediction predicts nothing."""
    tp = fp = fn = 0
    for gold, pred in zip(golds, preds):
        for f in fields:
            g, p = _values(gold.get(f), exact), _values((pred or {}).get(f), exact)
            tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
    return tp, fp, fn


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(tp: int, fp: int, fn: int) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn)
