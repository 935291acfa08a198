"""The generation plan: hold real rows out, set per-stratum quotas, then build one request per batch of examples.

    rows = with_strata(train_rows, hooks)                          # hooks = task.synth()
    holdout, pool = split_holdout(rows, share=0.3, seed=13)
    names = strata(hooks, labels, pool)                            # the labels, or the task's own strata
    quota = quotas(recipe.synth, names, pool, hooks, task_type)
    plan = build_plan(recipe.synth, hooks, names, pool, quota)    # [PlannedRequest]
    items, problem = parse_answer(answer_text)

A stratum is what the plan draws rows by: the label for a task with labels (classify), else what the
task's synth hooks say (extract: which fields are filled; generate: one stratum for every row), kept
in the row's ``stratum`` key. Per-label quotas and label proportions apply only to labels.

The stratum of each request is fixed first and the example written second (a teacher asked for "an
example" drifts to the labels it finds easy). Each request shows ``exemplars`` real rows of its
stratum, rotated through a shuffled pool with an optional per-row cap, and one value of each attribute
axis, cycled so every value is used about equally. Held-out rows are never shown to the teacher.
The task's synth hooks write each request's prompt and check each item of an answer.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from microtune.config import SynthConfig
from microtune.core.errors import RecipeError
from microtune.tasks import SynthHooks

Row = dict[str, Any]


@dataclass
class PlannedRequest:
    index: int
    label: str
    n: int
    exemplars: list[Row]
    attributes: dict[str, str]
    messages: list[dict[str, str]] = field(default_factory=list)


def stratum_of(row: Row) -> str:
    """The row's stratum: its ``stratum`` (task types without labels) or its label."""
    return row["stratum"] if "stratum" in row else row["label"]


def with_strata(rows: list[Row], hooks: SynthHooks) -> list[Row]:
    """The rows with their ``stratum`` when the task's hooks define one (a task with labels plans by the label itself)."""
    if hooks.stratum is None:
        return rows
    return [{**row, "stratum": hooks.stratum(row)} for row in rows]


def strata(hooks: SynthHooks, labels: list[str], pool: list[Row]) -> list[str]:
    """The strata the plan covers: the task's labels, or those of the real rows the teacher may see."""
    return list(labels) if hooks.stratum is None else sorted({stratum_of(r) for r in pool})


def split_holdout(rows: list[Row], share: float, seed: int) -> tuple[list[Row], list[Row]]:
    """``(holdout, pool)``, stratified by stratum (the label); a stratum keeps at least one row in the pool and,
    with two or more rows, gives at least one to the holdout."""
    rng = random.Random(seed)
    by_stratum: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_stratum[stratum_of(row)].append(row)
    holdout, pool = [], []
    for name in sorted(by_stratum):
        group = sorted(by_stratum[name], key=lambda r: r["source"])
        rng.shuffle(group)
        k = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * share)))
        holdout += group[:k]
        pool += group[k:]
    return holdout, pool


def quota_applies(cfg: SynthConfig, hooks: SynthHooks, task_type: str) -> None:
    """Per-label quotas and label weights need labels: on a task type without them, refuse with the fix."""
    if hooks.stratum is None:
        return
    if cfg.per_label is not None:
        raise RecipeError(f"synth.per_label asks for rows per label, but task.type {task_type} has no labels "
                          f"(its rows are planned by {hooks.strata})",
                          hint=f"set synth.total to the number of rows wanted instead (e.g. --set synth.total={cfg.per_label})")
    if isinstance(cfg.proportions, dict):
        raise RecipeError(f"synth.proportions maps labels to weights, but task.type {task_type} has no labels "
                          f"(its rows are planned by {hooks.strata})",
                          hint="use synth.proportions: uniform (every stratum the same share) or real (as in the real train "
                               "rows), or remove it")


def quotas(cfg: SynthConfig, labels: list[str], pool: list[Row], hooks: SynthHooks | None = None,
           task_type: str = "classify") -> dict[str, int]:
    """Accepted rows wanted per stratum (``labels``: the strata, the task's labels where it has them)."""
    if hooks is not None:
        quota_applies(cfg, hooks, task_type)
    if cfg.per_label is not None:
        return dict.fromkeys(labels, cfg.per_label)
    assert cfg.total is not None
    if cfg.proportions == "uniform":
        weights = dict.fromkeys(labels, 1.0)
    elif cfg.proportions == "real":
        counts = Counter(stratum_of(r) for r in pool)
        weights = {label: float(counts[label]) for label in labels}
    else:
        unknown = sorted(set(cfg.proportions) - set(labels))
        if unknown:
            raise RecipeError(f"synth.proportions names label(s) not in the task: {unknown}",
                              hint=f"use labels from: {', '.join(labels)}")
        weights = {label: float(cfg.proportions.get(label, 0.0)) for label in labels}
    return _largest_remainder(cfg.total, weights)


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    norm = sum(weights.values())
    if norm <= 0:
        raise RecipeError("synth.proportions gives every label a weight of 0", hint="give at least one label a positive weight")
    exact = {k: total * w / norm for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - out[k], reverse=True)[: total - sum(out.values())]:
        out[k] += 1
    return out


def build_plan(cfg: SynthConfig, hooks: SynthHooks, labels: list[str], pool: list[Row], quota: dict[str, int]) -> list[PlannedRequest]:
    rng = random.Random(cfg.seed)
    rotation = _ExemplarRotation(pool, cfg.exemplars, cfg.exemplar_max_uses, rng)
    axes = {axis: _Cycle(values, rng) for axis, values in sorted(cfg.attributes.items())}
    plan: list[PlannedRequest] = []
    for label in labels:
        wanted = math.ceil(quota[label] * cfg.oversample)
        while wanted > 0:
            n = min(cfg.examples_per_request, wanted)
            req = PlannedRequest(len(plan), label, n, rotation.take(label), {a: c.next() for a, c in axes.items()})
            req.messages = hooks.request(req)
            plan.append(req)
            wanted -= n
    return plan


class _ExemplarRotation:
    """Walk a shuffled pool per label; a row past its use cap is skipped, so later requests may show fewer."""

    def __init__(self, pool: list[Row], k: int, cap: int | None, rng: random.Random):
        self.k, self.cap, self.uses = k, cap, Counter[str]()
        self.pools: dict[str, list[Row]] = defaultdict(list)
        for row in pool:
            self.pools[stratum_of(row)].append(row)
        for group in self.pools.values():
            rng.shuffle(group)
        self.cursor: Counter[str] = Counter()

    def take(self, label: str) -> list[Row]:
        group, picked = self.pools.get(label, []), []
        for _ in range(len(group)):
            if len(picked) == self.k:
                break
            row = group[self.cursor[label] % len(group)]
            self.cursor[label] += 1
            if self.cap is None or self.uses[row["source"]] < self.cap:
                self.uses[row["source"]] += 1
                picked.append(row)
        return picked


class _Cycle:
    """Each value once per round, in a fresh shuffled order every round."""

    def __init__(self, values: list[str], rng: random.Random):
        self.values, self.rng, self.queue = list(values), rng, []  # type: ignore[var-annotated]

    def next(self) -> str:
        if not self.queue:
            self.queue = self.rng.sample(self.values, len(self.values))
        return self.queue.pop()


def tuning_rows(cfg: SynthConfig, hooks: SynthHooks, labels: list[str], pool: list[Row]) -> tuple[str, list[Row]]:
    """``(system, rows)`` that teach a model the request format: per real row, a request for one example of its stratum
    (other rows of the stratum as exemplars, sampled attributes) answered by that row in the JSON shape asked for."""
    rng = random.Random(cfg.seed)
    by_label: dict[str, list[Row]] = defaultdict(list)
    for row in pool:
        by_label[stratum_of(row)].append(row)
    system, rows = "", []
    for label in labels:
        for row in by_label.get(label, []):
            others = [r for r in by_label[label] if r is not row]
            attrs = {axis: rng.choice(values) for axis, values in sorted(cfg.attributes.items())}
            req = PlannedRequest(len(rows), label, 1, rng.sample(others, min(cfg.exemplars, len(others))), attrs)
            system, user = (m["content"] for m in hooks.request(req))
            rows.append({"text": user, "target": json.dumps({"examples": [hooks.answer_row(row)]})})
    return system, rows


_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$", re.IGNORECASE)


def parse_answer(content: str | None) -> tuple[list[Any], str | None]:
    """The items of an answer (raw, each validated later) or ``([], problem)`` when it is not the JSON asked for."""
    if content is None or not content.strip():
        return [], "empty answer"
    text = _FENCE.sub("", content.strip())
    data = _loads(text)
    if data is None:
        return [], "not valid JSON"
    if isinstance(data, dict) and "examples" in data:
        data = data["examples"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        return [], "JSON has no list of examples"
    return data, None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")  # prose around the object: keep the object
        if 0 <= start < end:
            try:
                return json.loads(text[start: end + 1])
            except json.JSONDecodeError:
                return None
    return None


def validate_item(item: Any, hooks: SynthHooks) -> tuple[Row | None, str | None]:
    """``(example, None)`` or ``(None, why)``: one item checked by the task's own row schema."""
    if not isinstance(item, dict):
        return None, f"an example must be a JSON object (got {type(item).__name__})"
    return hooks.parse_row(item)
