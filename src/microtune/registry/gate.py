"""The promotion gate: a challenger replaces the champion only when it truly wins.

    decision = decide(name, champion, challenger, evidence, cfg)    # Decision(verdict="promote"|"reject", reason=...)

Evidence is measured by the caller on one frozen evaluation set for both versions: the main metric of
each, a paired test's p-value (McNemar for classification, paired bootstrap otherwise), per-class
recall, the valid-answer rate and latency. Rules, in order: the main metric must rise by at least
``min_gain``; the paired test must be below ``alpha``; no class's recall may fall by more than
``recall_drop`` where the fall is beyond noise (the class's rows the challenger lost vs gained, one-sided
exact binomial test below ``alpha``: with ten rows a class, 10/10 → 8/10 is noise, 10/10 → 5/10 is not), the
valid rate may not fall by more than ``valid_rate_drop``, and latency may not grow beyond ``latency_ratio``
times the champion's. The first failing rule is the reason; every figure is kept.

The classical guard (classify): the caller also measures the version's margin over the classical baseline
(TF-IDF + logistic regression on the train split) on the same frozen set, with McNemar's p-value; it is
kept in the decision's details always, and with ``beat_classical`` a version — the first one too — that does not
beat it (margin > 0, p below ``alpha``) is rejected before any champion rule, naming the classical baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from microtune.config import GateConfig
from microtune.registry.models import Decision


@dataclass
class Evidence:
    main_metric: str
    champion: dict[str, Any]          # metrics of the champion on the frozen set
    challenger: dict[str, Any]
    p_value: float
    test: str                          # which paired test produced p_value
    examples: int
    recall: dict[str, dict[str, float]] = field(default_factory=dict)  # {"champion": {label: r}, "challenger": {...}}
    flips: dict[str, tuple[int, int]] = field(default_factory=dict)    # {label: (rows lost, rows gained) by the challenger}


@dataclass
class ClassicalMargin:
    """The version's main metric vs the classical baseline's on the gate's frozen set, and McNemar's p of the difference."""

    main_metric: str
    micro: float
    classical: float
    p_value: float
    examples: int
    source: str                        # where the classical predictions came from (the eval's file, or fitted by the gate)
    test: str = "McNemar"

    @property
    def margin(self) -> float:
        return self.micro - self.classical

    def details(self) -> dict[str, Any]:
        return {"main_metric": self.main_metric, "micro_value": self.micro, "classical_value": self.classical, "margin": self.margin,
                "p_value": self.p_value, "test": self.test, "examples": self.examples, "source": self.source}


def decide(name: str, champion: str | None, challenger: str, evidence: Evidence | None, cfg: GateConfig,
           classical: ClassicalMargin | None = None) -> Decision:
    guard = {"classical": {**classical.details(), "required": cfg.beat_classical}} if classical else {}
    failed = _classical_failure(classical, cfg)
    if champion is None or evidence is None:
        if failed:
            return Decision(name, challenger, None, "reject", f"first version: {failed}", guard)
        return Decision(name, challenger, None, "promote", "first version: no champion to beat", guard)
    ev, m = evidence, evidence.main_metric
    gain = ev.challenger[m] - ev.champion[m]
    details = {"main_metric": m, "champion_value": ev.champion[m], "challenger_value": ev.challenger[m], "gain": gain,
               "p_value": ev.p_value, "test": ev.test, "examples": ev.examples, "min_gain": cfg.min_gain, "alpha": cfg.alpha,
               "recall": ev.recall, "flips": ev.flips, **guard}
    reason = failed or _first_failure(ev, gain, cfg, details)
    if reason:
        return Decision(name, challenger, champion, "reject", reason, details)
    return Decision(name, challenger, champion, "promote",
                    f"{m} {ev.champion[m]:.4f} → {ev.challenger[m]:.4f} (+{gain:.4f}), {ev.test} p={ev.p_value:.4g}", details)


def _classical_failure(classical: ClassicalMargin | None, cfg: GateConfig) -> str | None:
    """With ``beat_classical``: why the version does not significantly beat the classical baseline (None when it does)."""
    if not cfg.beat_classical:
        return None
    if classical is None:
        return "gate.beat_classical is on but the classical baseline could not be measured (the version's eval folder is missing)"
    c, m = classical, classical.main_metric
    if c.margin <= 0:
        return (f"{m} {c.micro:.4f} does not beat the classical baseline (TF-IDF + logistic regression) {c.classical:.4f} "
                f"(margin {c.margin:+.4f}; gate.beat_classical)")
    if c.p_value >= cfg.alpha:
        return (f"{m} {c.micro:.4f} beats the classical baseline {c.classical:.4f} by {c.margin:+.4f}, not significantly: "
                f"{c.test} p={c.p_value:.4g} ≥ alpha {cfg.alpha} (gate.beat_classical)")
    return None


def _first_failure(ev: Evidence, gain: float, cfg: GateConfig, details: dict[str, Any]) -> str | None:
    m = ev.main_metric
    if gain < cfg.min_gain:
        return f"{m} gain {gain:+.4f} is below min_gain {cfg.min_gain}"
    if gain <= 0:  # min_gain 0 (or below): a challenger must still do better than the champion
        return f"{m} gain {gain:+.4f} is not above 0: the challenger does not beat the champion (min_gain {cfg.min_gain})"
    if ev.p_value >= cfg.alpha:
        return f"{m} gain {gain:+.4f} is not significant: {ev.test} p={ev.p_value:.4g} ≥ alpha {cfg.alpha}"
    drops = {label: ev.recall["champion"][label] - r for label, r in ev.recall.get("challenger", {}).items()
             if label in ev.recall.get("champion", {})}
    worst = max(drops.items(), key=lambda kv: kv[1], default=None)
    details["worst_recall_drop"] = worst
    noise = []
    for label, drop in sorted(drops.items(), key=lambda kv: -kv[1]):
        if drop <= cfg.recall_drop:
            break
        lost, gained = ev.flips.get(label, (0, 0))
        p = drop_p_value(lost, gained) if label in ev.flips else 0.0  # no flip counts: every large drop counts
        if p < cfg.alpha:
            details["recall_drops_within_noise"] = noise
            return (f"recall of {label!r} falls by {drop:.3f} (> recall_drop {cfg.recall_drop}; {lost} of its rows lost, "
                    f"{gained} gained, one-sided p={p:.3g} < alpha {cfg.alpha})")
        noise.append({"label": label, "drop": drop, "lost": lost, "gained": gained, "p_value": p})
    details["recall_drops_within_noise"] = noise
    valid_drop = ev.champion.get("valid_rate", 1.0) - ev.challenger.get("valid_rate", 1.0)
    if valid_drop > cfg.valid_rate_drop:
        return f"valid answers fall by {valid_drop:.3f} (> valid_rate_drop {cfg.valid_rate_drop})"
    old, new = ev.champion.get("latency_ms_p50"), ev.challenger.get("latency_ms_p50")
    if old and new and new > cfg.latency_ratio * old:
        return f"p50 latency {new:.1f} ms is over {cfg.latency_ratio}× the champion's {old:.1f} ms"
    return None


def drop_p_value(lost: int, gained: int) -> float:
    """One-sided exact binomial test that a class's rows flip to wrong more often than to right."""
    from scipy.stats import binomtest

    return float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue) if lost + gained else 1.0
