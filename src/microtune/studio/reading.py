"""What the Studio's pages show, read from the workspace's artifacts and its MLflow store — never recomputed.

Every page reads the files the pipeline wrote (``datasets/<hash>/manifest.json``, ``evals/<run>/metrics.json``,
``decisions/v<N>.json``, ``synthetic/<run>/``, ``watch/``) and the registry (``pipeline.versions``), so a number on a
page is the number in the artifact. Names and ids that arrive in a URL are looked up among the folders and versions
that exist (``recipe_names``, ``artifact_ids``, ``version_of``) and only the found entry is used as a path: a
request can name an artifact, never build a path.
"""
from __future__ import annotations

import functools
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microtune.core.errors import InputError
from microtune.core.names import is_valid_name
from microtune.core.workspace import Workspace
from microtune.evaluation.report import report_context
from microtune.pipeline.versions import list_models, list_versions, registry_at
from microtune.registry.models import CHAMPION, Version

MICRO = "micro"
MODEL_FREE = {"classical", "lead"}  # baselines that prompt no model: not "prompted"
STAGES = ("datasets", "adapters", "evals", "synthetic", "decisions", "watch")


class NotFound(InputError):
    """A name or id in a URL that the workspace does not hold (the page answers 404 with what exists)."""


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


# -- lookups: a URL part becomes a path only through these ------------------------------------------
def recipe_names(ws: Workspace) -> list[str]:
    """Recipes with artifacts in the workspace: folders with a known stage folder inside, valid names only."""
    if not ws.root.is_dir():
        return []
    return sorted(p.name for p in ws.root.iterdir() if p.is_dir() and is_valid_name(p.name) and any((p / s).is_dir() for s in STAGES))


def recipe_dir(ws: Workspace, name: str) -> Path:
    for known in recipe_names(ws):
        if known == name:
            return ws.root / known
    raise NotFound(f"no recipe named {name[:60]!r} in this workspace", hint=f"recipes here: {', '.join(recipe_names(ws)) or 'none yet'}")


def artifact_ids(ws: Workspace, recipe: str, stage: str) -> list[str]:
    """Finished artifacts of a stage (folders with a manifest), newest first: by the manifest's time, as a dataset's id is a
    content hash (run ids, timestamps, break ties)."""
    folder = recipe_dir(ws, recipe) / stage
    if not folder.is_dir():
        return []
    found = [(p / "manifest.json", p.name) for p in folder.iterdir() if (p / "manifest.json").is_file() and not p.name.startswith(".")]
    return [name for _, name in sorted(found, key=lambda f: (f[0].stat().st_mtime_ns, f[1]), reverse=True)]


def artifact_dir(ws: Workspace, recipe: str, stage: str, run_id: str) -> Path:
    for known in artifact_ids(ws, recipe, stage):
        if known == run_id:
            return recipe_dir(ws, recipe) / stage / known
    raise NotFound(f"no {stage} artifact {run_id[:60]!r} for recipe {recipe!r}",
                   hint=f"{stage} here: {', '.join(artifact_ids(ws, recipe, stage)[:10]) or 'none'}")


def model_names(ws: Workspace) -> list[str]:
    return [m.name for m in list_models(ws.root)] if ws.mlflow_db.is_file() else []


def require_model(ws: Workspace, name: str) -> str:
    for known in model_names(ws):
        if known == name:
            return known
    raise NotFound(f"no registered model named {name[:60]!r}", hint=f"registered: {', '.join(model_names(ws)) or 'none yet'}")


def version_of(ws: Workspace, name: str, version: str) -> Version:
    for v in list_versions(require_model(ws, name), ws.root):
        if v.version == version:
            return v
    raise NotFound(f"model {name!r} has no version {version[:20]!r}")


def _inside(ws: Workspace, path_text: str | None) -> Path | None:
    """A path recorded in a registry tag, used only when it lies inside this workspace and exists."""
    if not path_text:
        return None
    path = Path(path_text).resolve()
    return path if path.is_relative_to(ws.root) and path.exists() else None


# -- scoreboard ---------------------------------------------------------------------------------------
@dataclass
class Score:
    name: str
    task: str
    champion: str | None
    metric: str
    value: float | None
    ci: tuple[float, float] | None
    baseline: str | None
    baseline_value: float | None
    baseline_ci: tuple[float, float] | None
    usd_per_1k: float | None
    latency_ms: float | None
    verdict: str | None
    verdict_version: str | None
    verdict_at: float | None
    versions: int = 0


def eval_metrics(ws: Workspace, version: Version) -> dict[str, Any]:
    folder = _inside(ws, version.tags.get("eval_dir"))
    return _json(folder / "metrics.json") if folder else {}


def best_prompted(metrics: dict[str, Any], metric: str) -> str | None:
    """The prompted baseline (zero-shot, few-shot, an endpoint) with the highest main metric."""
    prompted = [s for s in metrics if s != MICRO and s not in MODEL_FREE and metrics[s].get(metric) is not None]
    return max(prompted, key=lambda s: metrics[s][metric], default=None)


def _ci(values: dict[str, Any], metric: str) -> tuple[float, float] | None:
    pair = (values.get("ci") or {}).get(metric)
    return (float(pair[0]), float(pair[1])) if pair else None


def score(ws: Workspace, name: str) -> Score:
    versions = list_versions(name, ws.root)
    champ = next((v for v in versions if CHAMPION in v.aliases), None)
    shown = champ or versions[0]
    metric = shown.tags.get("main_metric", "accuracy")
    metrics = eval_metrics(ws, shown)
    micro = metrics.get(MICRO, {})
    base = best_prompted(metrics, metric)
    gated = next((v for v in versions if v.tags.get("gate.verdict")), None)
    return Score(name=name, task=shown.tags.get("task", "?"), champion=champ.version if champ else None, metric=metric,
                 value=micro.get(metric, shown.metrics.get(metric)), ci=_ci(micro, metric), baseline=base,
                 baseline_value=metrics[base][metric] if base else None, baseline_ci=_ci(metrics[base], metric) if base else None,
                 usd_per_1k=micro.get("usd_per_1k"), latency_ms=micro.get("latency_ms_p50"),
                 verdict=gated.tags.get("gate.verdict") if gated else None, verdict_version=gated.version if gated else None,
                 verdict_at=float(gated.tags["gate.at"]) if gated and gated.tags.get("gate.at") else None, versions=len(versions))


SORT_KEYS = {"name": lambda s: s.name, "task": lambda s: s.task, "metric": lambda s: s.value if s.value is not None else -1.0,
             "baseline": lambda s: s.baseline_value if s.baseline_value is not None else -1.0,
             "cost": lambda s: s.usd_per_1k if s.usd_per_1k is not None else float("inf"),
             "latency": lambda s: s.latency_ms if s.latency_ms is not None else float("inf"),
             "gate": lambda s: s.verdict_at or 0.0}


def scoreboard(ws: Workspace, sort: str = "name", desc: bool = False) -> list[Score]:
    if sort not in SORT_KEYS:
        raise InputError(f"cannot sort by {sort[:30]!r}", hint=f"sort by one of: {', '.join(SORT_KEYS)}")
    return sorted((score(ws, n) for n in model_names(ws)), key=SORT_KEYS[sort], reverse=desc)


# -- model and version pages ------------------------------------------------------------------------
LINEAGE = ("base_model", "base_model_source", "base_model_hash", "dataset_hash", "recipe_hash", "chat_template_hash", "microtune_version",
           "git_commit", "seed")


@dataclass
class VersionView:
    version: Version
    lineage: dict[str, str]
    decision: dict[str, Any] | None
    eval_run: str | None
    train_run: str | None
    recipe: str


def version_view(ws: Workspace, v: Version) -> VersionView:
    recipe = v.name
    decision = None
    if recipe in recipe_names(ws):
        path = ws.root / recipe / "decisions" / f"v{int(v.version)}.json"  # int(): a registry version number, never a URL part
        decision = _json(path) or None
    if decision is None and v.tags.get("gate.verdict"):  # a manual promotion records tags only
        decision = {"verdict": v.tags["gate.verdict"], "reason": v.tags.get("gate.reason", ""), "champion": v.tags.get("gate.champion"),
                    "at": float(v.tags.get("gate.at", 0) or 0), "details": {}}
    elif decision is not None and v.tags.get("gate.reason", "").startswith("manual:"):  # a later manual promotion: show it
        decision = {"verdict": v.tags["gate.verdict"], "reason": v.tags["gate.reason"], "champion": v.tags.get("gate.champion"),
                    "at": float(v.tags.get("gate.at", 0) or 0), "details": {}, "gate_decision": decision}
    eval_dir, adapter_dir = _inside(ws, v.tags.get("eval_dir")), _inside(ws, v.tags.get("adapter_dir"))
    return VersionView(v, {k: v.tags[k] for k in LINEAGE if v.tags.get(k)}, decision, eval_dir.name if eval_dir else None,
                       adapter_dir.name if adapter_dir else None, recipe)


def model_view(ws: Workspace, name: str) -> list[VersionView]:
    return [version_view(ws, v) for v in list_versions(require_model(ws, name), ws.root)]


# -- run pages ---------------------------------------------------------------------------------------
@dataclass
class RunView:
    recipe: str
    run_id: str
    manifest: dict[str, Any]
    loss: list[tuple[int, float]]
    valid_loss: list[tuple[int, float]]
    loss_source: str
    cost: dict[str, Any]
    evals: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)


def _history(uri: str, run_id: str | None, key: str) -> list[tuple[int, float]]:
    if not run_id:
        return []
    try:
        client = registry_at_uri(uri)
        return [(int(m.step), float(m.value)) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
    except Exception:  # a run missing from the store: the adapter's own history is shown instead
        return []


def registry_at_uri(uri: str) -> Any:
    from microtune.registry.models import registry_client

    return registry_client(uri)


def _manifest_history(values: Any) -> list[tuple[int, float]]:
    out = []
    for i, item in enumerate(values or []):
        if isinstance(item, dict):
            loss = item.get("loss", item.get("valid_loss"))
            if loss is not None:
                out.append((int(item.get("step", i + 1)), float(loss)))
        elif isinstance(item, (int, float)):
            out.append((i + 1, float(item)))
    return out


def run_view(ws: Workspace, recipe: str, run_id: str) -> RunView:
    folder = artifact_dir(ws, recipe, "adapters", run_id)
    manifest = _json(folder / "manifest.json")
    mlflow_run = manifest.get("mlflow_run_id")
    uri = registry_at(ws.root).tracking_uri if ws.mlflow_db.is_file() else ""
    loss, valid = (_history(uri, mlflow_run, "loss"), _history(uri, mlflow_run, "valid_loss")) if uri else ([], [])
    source = "MLflow metric history"
    if not loss:
        loss, valid, source = _manifest_history(manifest.get("history")), _manifest_history(manifest.get("valid_history")), "the adapter manifest"
    evals = [e for e in artifact_ids(ws, recipe, "evals") if _json(artifact_dir(ws, recipe, "evals", e) / "manifest.json").get("adapter_dir")
             == str(folder)]
    evals.sort(key=lambda e: e != run_id)  # its own eval first; re-scorings on another test set (`…-on-<hash>`) after
    versions = [v.version for v in list_versions(recipe, ws.root) if v.tags.get("adapter_dir") == str(folder)] \
        if recipe in model_names(ws) else []
    return RunView(recipe, run_id, manifest, loss, valid, source, manifest.get("cost", {}), evals, versions)


def eval_report(ws: Workspace, recipe: str, run_id: str) -> dict[str, Any]:
    """The eval report's context (``evaluation.report.report_context``) for an eval the workspace holds: what
    ``eval/report_body.html`` shows on the run page, exactly the sections of the artifact's own ``report.html``."""
    folder = artifact_dir(ws, recipe, "evals", run_id)
    stamp = tuple((folder / n).stat().st_mtime_ns if (folder / n).is_file() else 0 for n in EVAL_FILES)
    return _report_context(str(folder), stamp)


EVAL_FILES = ("predictions.jsonl", "metrics.json", "stats.json", "manifest.json")


@functools.lru_cache(maxsize=8)
def _report_context(folder: str, stamp: tuple[int, ...]) -> dict[str, Any]:
    """Drawing the report's plots takes a second or more on a wide label set: kept until the eval's files change (``stamp``)."""
    return report_context(folder)


# -- data pages ---------------------------------------------------------------------------------------
def dataset_view(ws: Workspace, recipe: str, dataset_id: str) -> dict[str, Any]:
    folder = artifact_dir(ws, recipe, "datasets", dataset_id)
    manifest = _json(folder / "manifest.json")
    stats = manifest.get("stats", {})
    return {"id": dataset_id, "manifest": manifest, "stats": stats, "warnings": [split_where(w) for w in manifest.get("warnings", [])],
            "sources": manifest.get("sources", {}), "histogram": stats.get("train_tokens_histogram")}


def split_where(warning: str) -> dict[str, str]:
    """``file:line: what`` → its parts, so the page can show where each warning points."""
    head, sep, rest = warning.partition(": ")
    if sep and ":" in head and head.rsplit(":", 1)[1].isdigit():
        return {"where": head, "what": rest}
    return {"where": "", "what": warning}


FUNNEL_ORDER = ("schema", "label", "stratum", "grounding", "length", "target_length", "target_copy", "refusal", "pii", "copy",
                "near_duplicate", "probe", "judge", "quota")


def synth_view(ws: Workspace, recipe: str, run_id: str, examples: int = 3) -> dict[str, Any]:
    """The acceptance funnel per filter stage, example rejects per reason, and the fidelity figures."""
    folder = artifact_dir(ws, recipe, "synthetic", run_id)
    manifest, fidelity = _json(folder / "manifest.json"), _json(folder / "fidelity.json")
    filters = manifest.get("filters", {})
    funnel = [{"stage": name, **filters[name]} for name in filters]
    rejects: dict[str, list[dict[str, Any]]] = {}
    for row in _jsonl(folder / "rejected.jsonl"):
        bucket = rejects.setdefault(str(row.get("reason", "?")), [])
        if len(bucket) < examples:
            bucket.append(row)
    counts: dict[str, int] = {}
    for row in _jsonl(folder / "rejected.jsonl"):
        counts[str(row.get("reason", "?"))] = counts.get(str(row.get("reason", "?")), 0) + 1
    return {"id": run_id, "manifest": manifest, "fidelity": fidelity, "funnel": funnel, "rejects": rejects, "reject_counts": counts}


# -- watch page --------------------------------------------------------------------------------------
def watch_view(ws: Workspace, recipe: str) -> dict[str, Any]:
    folder = recipe_dir(ws, recipe) / "watch"
    out: dict[str, Any] = {"files": [], "rounds": [], "reports": [], "quarantine": {}, "series": []}  # a recipe never watched: empty
    if not folder.is_dir():
        return out
    state = folder / "state.db"
    if state.is_file():
        with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as con:
            out["files"] = [{"checksum": c, "path": p, "accepted": a, "rejected": r, "at": at}
                            for c, p, a, r, at in con.execute("select checksum, path, accepted, rejected, at from files order by at")]
            out["rounds"] = [{"id": i, "status": s, "triggers": json.loads(t or "[]"), "version": v, "verdict": d, "at": at}
                             for i, s, t, v, d, at in con.execute("select id, status, triggers, version, verdict, at from rounds order by id")]
    for report in sorted((folder / "reports").glob("*.json")) if (folder / "reports").is_dir() else []:
        out["reports"].append(_json(report) | {"file": report.name})
    for q in sorted((folder / "quarantine").glob("*.txt")) if (folder / "quarantine").is_dir() else []:
        checksum = q.name.rsplit(".", 2)[-2] if q.name.count(".") >= 2 else ""
        out["quarantine"][checksum] = [split_where(line) for line in q.read_text(encoding="utf-8").splitlines() if line.strip()]
    for f in out["files"]:
        f["problems"] = out["quarantine"].get(f["checksum"][:8], [])
    out["series"] = drift_series(out["reports"])
    return out


DRIFT = (("new_rows", ("new_rows",), "min_new_rows", "≥"), ("label shift p", ("label_shift", "p_value"), "label_shift_p", "<"),
         ("PSI", ("label_shift", "psi"), "psi_threshold", ">"), ("text drift AUC", ("text_drift", "auc"), "text_drift_auc", ">"))


def drift_series(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each drift statistic over the reports, beside its threshold (None where a report did not measure it)."""
    out = []
    for title, path, threshold, rule in DRIFT:
        points = []
        for r in reports:
            value: Any = r.get("statistics", {})
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            points.append({"at": r.get("at", r["file"]), "value": value, "threshold": (r.get("thresholds") or {}).get(threshold)})
        if any(p["value"] is not None for p in points):
            out.append({"name": title, "rule": rule, "threshold_key": threshold, "points": points})
    return out


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "—"
