"""The evaluation report: one self-contained ``report.html`` (plots inline as base64 PNG) + the PNGs beside it.

    render_report(eval_dir)          # reads predictions.jsonl, metrics.json, stats.json; writes report.html, *.png
    microtune report EVAL_DIR        # the same from the command line (re-renders an existing eval artifact)
    report_context(eval_dir)         # what the templates show: another page embeds eval/report_body.html with it

Sections: summary table (every metric with its bootstrap interval, p-value vs the micro-model,
latency, throughput, cost), metric intervals plot, paired tests, per-class F1 bars, confusion matrix
of the micro-model, confidence histogram and calibration curve, the worst errors with their inputs,
latency. Everything comes from the files of the eval artifact, so a report can be rebuilt anywhere,
offline. Plots use matplotlib's object API (``Figure``, Agg canvas): no pyplot global state, no display.
The HTML comes from the shared Jinja2 templates (``core/templates/eval/``: ``report.html`` is the page shell around
``report_body.html``), autoescaped: a label or input text is shown as text, never as markup.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from microtune.core.atomic import read_json, write_bytes, write_text
from microtune.core.errors import ArtifactError
from microtune.core.jsonl import read_jsonl
from microtune.core.templating import pvalue, render

MICRO = "micro"
SECTIONS = ("Summary", "Metric intervals", "Paired tests", "Per-class F1", "Confusion matrix",
            "Confidence and calibration", "Worst errors", "Latency")
COLORS = {"micro": "#2a7f3f"}
PALETTE = ["#8c8c8c", "#5b7db1", "#c27c3a", "#8a5ba8", "#b14d5b"]


def _load(eval_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    needed = ["predictions.jsonl", "metrics.json", "stats.json"]
    missing = [n for n in needed if not (eval_dir / n).is_file()]
    if missing:
        raise ArtifactError(f"{eval_dir} lacks {', '.join(missing)}: not an eval artifact this version of microtune can report on",
                            hint="pass an eval folder (.microtune/<recipe>/evals/<run>), or rerun `microtune eval RECIPE`")
    return read_jsonl(eval_dir / "predictions.jsonl"), read_json(eval_dir / "metrics.json"), read_json(eval_dir / "stats.json")


def _color(system: str, systems: list[str]) -> str:
    return COLORS.get(system) or PALETTE[[s for s in systems if s != MICRO].index(system) % len(PALETTE)]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


# -- plots ----------------------------------------------------------------------------------------
def plot_intervals(metrics: dict[str, Any], systems: list[str], confidence: float = 0.95) -> bytes | None:
    names = [k for k in ("accuracy", "macro_f1", "valid_rate") if all(k in metrics[s].get("ci", {}) for s in systems)]
    names = names or sorted({k for s in systems for k in metrics[s].get("ci", {})})[:4]
    if not names:
        return None
    fig = _figure(1.8 + 1.6 * len(names), 3.2)
    ax = fig.subplots()
    width = 0.8 / len(systems)
    for j, s in enumerate(systems):
        vals = [metrics[s][n] for n in names]
        lo = [v - metrics[s]["ci"][n][0] for v, n in zip(vals, names)]
        hi = [metrics[s]["ci"][n][1] - v for v, n in zip(vals, names)]
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=s, color=_color(s, systems))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"metrics with {confidence:.0%} bootstrap intervals")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def plot_per_class(metrics: dict[str, Any], systems: list[str]) -> bytes | None:
    per = {s: metrics[s].get("per_label_f1") for s in systems}
    if not per.get(MICRO):
        return None
    labels = list(per[MICRO])
    fig = _figure(7, 0.9 + 0.24 * len(labels) * len(systems) / 2)
    ax = fig.subplots()
    height = 0.8 / len(systems)
    for j, s in enumerate(systems):
        ys = [i + (j - (len(systems) - 1) / 2) * height for i in range(len(labels))]
        ax.barh(ys, [(per[s] or {}).get(label, 0.0) for label in labels], height, label=s, color=_color(s, systems))
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title("F1 per class")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def plot_confusion(rows: list[dict[str, Any]], system: str) -> bytes | None:
    from sklearn.metrics import confusion_matrix

    golds = [r["gold"] for r in rows]
    if not all(isinstance(g, str) for g in golds):
        return None
    preds = [r[system]["pred"] if r[system]["pred"] is not None else "<invalid>" for r in rows]
    labels = sorted(set(golds) | set(preds))
    matrix = confusion_matrix(golds, preds, labels=labels)
    size = min(4 + 0.28 * len(labels), 14)
    fig = _figure(size, size)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Greens")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_title(f"confusion matrix: {system}")
    return _png(fig)


def calibration(rows: list[dict[str, Any]], system: str, bins: int = 10) -> dict[str, Any] | None:
    """Reliability of a system's label probability: binned accuracy vs confidence, and the expected calibration error."""
    import numpy as np

    pairs = [(r[system]["prob"], r[system]["pred"] == r["gold"]) for r in rows if r[system].get("prob") is not None]
    if not pairs:
        return None
    prob, correct = np.array([p for p, _ in pairs]), np.array([c for _, c in pairs], dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    table = [(float(prob[which == b].mean()), float(correct[which == b].mean()), int((which == b).sum()))
             for b in range(bins) if (which == b).any()]
    ece = sum(n * abs(conf - acc) for conf, acc, n in table) / len(prob)
    return {"bins": table, "ece": float(ece), "prob": prob.tolist(), "correct": correct.tolist()}


def plot_calibration(rows: list[dict[str, Any]], systems: list[str]) -> bytes | None:
    cal = {s: calibration(rows, s) for s in systems}
    cal = {s: c for s, c in cal.items() if c}
    if not cal:
        return None
    fig = _figure(10, 3.6)
    hist, rel = fig.subplots(1, 2)
    for s, c in cal.items():
        hist.hist(c["prob"], bins=20, range=(0, 1), histtype="step", linewidth=1.6, label=s, color=_color(s, systems))
        rel.plot([b[0] for b in c["bins"]], [b[1] for b in c["bins"]], marker="o", label=f"{s} (ECE {c['ece']:.3f})",
                 color=_color(s, systems))
    hist.set_xlabel("probability of the predicted label")
    hist.set_ylabel("test rows")
    hist.set_title("confidence histogram")
    hist.legend(fontsize=8)
    rel.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=1)
    rel.set_xlabel("mean confidence (10 bins)")
    rel.set_ylabel("accuracy")
    rel.set_title("calibration")
    rel.legend(fontsize=8)
    return _png(fig)


def plot_latency(metrics: dict[str, Any], systems: list[str]) -> bytes | None:
    have = [s for s in systems if metrics[s].get("latency_n")]
    if not have:
        return None
    fig = _figure(1.5 + 1.3 * len(have), 3.2)
    ax = fig.subplots()
    xs = range(len(have))
    ax.bar([x - 0.2 for x in xs], [metrics[s]["latency_ms_p50"] for s in have], 0.4, label="p50", color="#5b7db1")
    ax.bar([x + 0.2 for x in xs], [metrics[s]["latency_ms_p95"] for s in have], 0.4, label="p95", color="#c27c3a")
    ax.set_xticks(list(xs), have)
    ax.set_ylabel("ms per example")
    ax.set_title("latency per example")
    ax.legend(fontsize=8)
    return _png(fig)


# -- html -----------------------------------------------------------------------------------------
PLOT_SECTIONS = {"Metric intervals": ("intervals.png", "metric intervals"), "Per-class F1": ("per_class_f1.png", "per-class F1"),
                 "Confusion matrix": ("confusion_matrix.png", "confusion matrix"),
                 "Confidence and calibration": ("calibration.png", "confidence and calibration")}


def _paired(stats: dict[str, Any]) -> list[list[str]]:
    """The paired-tests table's rows (plain text: the template escapes them)."""
    body = []
    for s, comp in stats["comparisons"].items():
        if "mcnemar" in comp:
            mc = comp["mcnemar"]
            body.append([f"micro vs {s}", "McNemar (correctness)", f"only micro right {mc['b']}, only {s} right {mc['c']}",
                         f"exact {pvalue(mc['p_value'])}, mid-p {pvalue(mc['mid_p'])}"])
        for metric, res in comp["metrics"].items():
            interval = f" [{res['low']:+.3f}, {res['high']:+.3f}]" if "low" in res else ""  # evals written before it have none
            body.append([f"micro vs {s}", f"paired bootstrap ({metric})", f"Δ = {res['delta']:+.3f}{interval}", pvalue(res["p_value"])])
    return body


def _worst(rows: list[dict[str, Any]], systems: list[str], limit: int = 20) -> dict[str, Any]:
    """The micro-model's wrong rows, confidently wrong first (the errors that hurt most), at most ``limit`` of them."""
    wrong = [r for r in rows if r[MICRO]["pred"] != r["gold"]]
    wrong.sort(key=lambda r: -(r[MICRO].get("prob") or 0.0))
    return {"rows": wrong[:limit], "n_wrong": len(wrong), "n_rows": len(rows), "others": [s for s in systems if s != MICRO]}


def report_context(eval_dir: str | Path) -> dict[str, Any]:
    """Everything ``eval/report_body.html`` shows, from an eval folder's files (plots drawn, not written): the one input of
    the standalone page and of any page that embeds the report's body (``{% include "eval/report_body.html" %}``)."""
    eval_dir = Path(eval_dir)
    rows, metrics, stats = _load(eval_dir)
    systems = list(metrics)
    plots = {
        "intervals.png": plot_intervals(metrics, systems, stats.get("confidence", 0.95)),
        "per_class_f1.png": plot_per_class(metrics, systems),
        "confusion_matrix.png": plot_confusion(rows, MICRO) if MICRO in systems else None,
        "calibration.png": plot_calibration(rows, systems),
        "latency.png": plot_latency(metrics, systems),
    }
    return {"title": _title(eval_dir, len(rows)), "sections": list(SECTIONS), "plot_sections": PLOT_SECTIONS, "micro": MICRO,
            "systems": systems, "metrics": metrics, "stats": stats, "ci_names": list(next(iter(metrics.values())).get("ci", {})),
            "plots": plots, "paired": _paired(stats), "worst": _worst(rows, systems) if MICRO in systems else None}


def render_report(eval_dir: str | Path) -> Path:
    """Write ``report.html`` and the PNG plots into ``eval_dir`` from its files; returns the report path."""
    eval_dir = Path(eval_dir)
    context = report_context(eval_dir)
    for name, data in context["plots"].items():
        if data is not None:
            write_bytes(eval_dir / name, data)  # atomic: a re-render never leaves a half-written file
    write_text(eval_dir / "report.html", render("eval/report.html", title=context["title"], report=context))
    return eval_dir / "report.html"


def _title(eval_dir: Path, n: int) -> str:
    manifest = eval_dir / "manifest.json"
    recipe = read_json(manifest).get("recipe") if manifest.is_file() else eval_dir.parent.parent.name
    return f"microtune evaluation: {recipe} — {n} test rows ({eval_dir.name})"
