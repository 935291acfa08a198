"""A gate decision (``decisions/v<N>.json``) explained rule by rule, in the order ``registry.gate.decide`` applies them.

The decision file keeps every figure and the first failing rule's reason; the rules after that one were never
evaluated, so they show as "not reached" rather than as passed. Thresholds the details do not carry
(``recall_drop``, ``valid_rate_drop``, ``latency_ratio``) come from the version's own recipe (``recipe.json`` of its
adapter), falling back to the gate's defaults.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from microtune.config import GateConfig


@dataclass
class Rule:
    name: str
    figure: str
    threshold: str
    status: str  # "passed" | "failed" | "not reached" | "off"


# How the reason of each rule's failure reads (registry/gate.py), tried in this order; the first match names the failing
# rule. Anchored on each message's own words: a recall failure also says "… rows gained", which is not the gain rule.
_FAILS = (("classical", re.compile(r"classical baseline")),
          ("significance", re.compile(r"^\S+ gain \S+ is not significant")),
          ("gain", re.compile(r"^\S+ gain \S+ is (below min_gain|not above 0)")),
          ("recall", re.compile(r"^recall of ")),
          ("valid", re.compile(r"^valid answers fall")),
          ("latency", re.compile(r"^p50 latency")))


def failing_rule(reason: str, verdict: str) -> str | None:
    """The key of the rule a rejection failed on (None for a promotion; "other" for a reason no rule words like this)."""
    if verdict != "reject":
        return None
    return next((rule for rule, pattern in _FAILS if pattern.search(reason)), "other")


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def explain(decision: dict[str, Any], gate: dict[str, Any] | None = None) -> list[Rule]:
    """Rows for the page: each rule with its figure, threshold and outcome."""
    cfg = GateConfig().model_dump() | (gate or {})
    d, verdict = decision.get("details") or {}, decision.get("verdict", "")
    failing = failing_rule(decision.get("reason", ""), verdict)
    rules: list[tuple[str, Rule]] = []
    c = d.get("classical")
    if c:
        required = bool(c.get("required"))
        rules.append(("classical", Rule("beats the classical baseline (TF-IDF + logistic regression)",
                                        f"{c['main_metric']} {_num(c['micro_value'])} vs {_num(c['classical_value'])} (margin "
                                        f"{c['margin']:+.4f}, {c.get('test', 'McNemar')} p={_num(c['p_value'])})",
                                        f"margin > 0 and p < {cfg['alpha']}" if required else "recorded only (gate.beat_classical off)",
                                        "passed" if required else "off")))
    if "gain" in d:
        m = d.get("main_metric", "metric")
        rules.append(("gain", Rule(f"{m} rises by at least min_gain", f"{_num(d['champion_value'])} → {_num(d['challenger_value'])} "
                                   f"(gain {d['gain']:+.4f})", f"gain ≥ {d.get('min_gain', cfg['min_gain'])} and > 0", "passed")))
        rules.append(("significance", Rule(f"the gain is significant ({d.get('test', '')})", f"p = {_num(d['p_value'])} on "
                                           f"{d.get('examples', '?')} rows", f"p < {d.get('alpha', cfg['alpha'])}", "passed")))
        worst = d.get("worst_recall_drop")
        figure = f"largest drop {worst[0]!s}: {worst[1]:+.3f}" if worst else "—"
        noise = d.get("recall_drops_within_noise") or []
        if noise:
            figure += f"; {len(noise)} drop(s) within noise"
        rules.append(("recall", Rule("no class's recall falls beyond noise", figure, f"drop ≤ {cfg['recall_drop']} or one-sided p ≥ "
                                     f"{cfg['alpha']}", "passed")))
        rules.append(("valid", Rule("the valid-answer rate holds", "—", f"fall ≤ {cfg['valid_rate_drop']}", "passed")))
        rules.append(("latency", Rule("p50 latency holds", "—", f"≤ {cfg['latency_ratio']}× the champion's", "passed")))
    if failing is not None and failing not in {key for key, _ in rules}:
        rules.append((failing, Rule("the gate's reason", decision.get("reason", "") or "—", "—", "failed")))
    return _mark(rules, failing)


def _mark(rules: list[tuple[str, Rule]], failing: str | None) -> list[Rule]:
    """Rules before the failing one passed, the failing one failed, the rest were never reached."""
    out, seen = [], False
    for key, rule in rules:
        if seen:
            rule.status = "not reached"
        elif key == failing:
            rule.status, seen = "failed", True
        out.append(rule)
    return out
