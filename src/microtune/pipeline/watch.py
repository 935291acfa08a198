"""`microtune watch`: new labelled data or drift triggers a retrain that is promoted only if it wins.

    report = watch("recipes/faa-maintenance.yaml")                # one cycle (cron, Airflow, Prefect)
    watch("recipes/faa-maintenance.yaml", every_s=3600)           # until SIGTERM / Ctrl-C

One cycle reads top to bottom: finish a round a crash interrupted → ingest new inbox files (each file
once, by checksum; bad rows quarantined with a file:line report, never trained on) → triggers on the
rows not yet used (count, new labels, label shift, text drift) → on a trigger, a round: train on the
recipe's data plus every accepted new row (replay: old labels stay in the mix), evaluate on the frozen
set (the recipe's test split plus the held-out share of the new rows), register, and let the gate
decide (pipeline/gate.py). A drift report with every statistic and threshold is written each cycle.

Crash safety: the state (SQLite, one transaction per step) records files, rows and rounds; a round's
version is found again by its ``watch.round`` tag, so a rerun after kill -9 never registers twice.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.artifacts import write_json
from microtune.core.crashpoints import reach
from microtune.core.errors import ProblemLog, RecipeError
from microtune.core.hashing import hash_file
from microtune.core.jsonl import write_jsonl
from microtune.core.progress import Reporter, emitter
from microtune.core.workspace import Workspace
from microtune.data import build_dataset, label_shift, load_rows, text_drift_auc
from microtune.data.dataset import normalize_text
from microtune.evaluation import score_examples
from microtune.models import resolve_base
from microtune.pipeline.gate import gate
from microtune.pipeline.recipes import RecipeLike, resolve_recipe
from microtune.pipeline.run import run
from microtune.registry.models import CHAMPION, RegistryError, adapter_path, by_alias, list_versions, registry_client
from microtune.registry.tracking import tracking_uri
from microtune.tasks import TASKS, ClassifyConfig

Say = Callable[[str], None]
PATTERNS = ("*.jsonl", "*.csv", "*.tsv", "*.parquet", "*.pq")  # what data.format=auto reads (data/readers.py)
ROW_FIELDS = ("task.text_field=text", "task.label_field=label", "task.target_field=target")  # the plain names of stored rows


def _row_fields(recipe: Recipe) -> list[str]:
    """The ROW_FIELDS overrides the recipe's task section has (a classify section has no target_field, and so on)."""
    fields = type(recipe.task).model_fields
    return [item for item in ROW_FIELDS if item.partition("=")[0].removeprefix("task.") in fields]
SCHEMA = """
create table if not exists files (checksum text primary key, path text, accepted int, rejected int, at real);
create table if not exists rows (id integer primary key autoincrement, checksum text, data text, holdout int, round int);
create table if not exists rounds (id integer primary key, status text, triggers text, version text, verdict text, at real);
"""


@contextmanager
def _state(path: Path) -> Iterator[sqlite3.Connection]:
    """The watch state, its file born with its tables: a reader (the Studio, a second watcher) never sees a state.db
    without them — the schema is written beside it and hard-linked into place, which fails if another got there first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fresh = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
        with closing(sqlite3.connect(fresh)) as con:
            con.executescript(SCHEMA)
        try:
            os.link(fresh, path)
        except OSError:  # another got there first, or the filesystem has no hard links: the connect below opens it
            pass
        finally:
            fresh.unlink()
    con = sqlite3.connect(path, timeout=30)
    try:
        con.executescript(SCHEMA)
        yield con
    finally:
        con.close()


def watch(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None, *,
          every_s: float | None = None, reporter: Reporter | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """`microtune watch`: one cycle, or with ``every_s`` a cycle every ``every_s`` seconds until SIGTERM/SIGINT (or
    ``stop`` is set); returns the report of the last cycle run ({} when stopped before the first)."""
    if every_s is None:
        return watch_once(recipe, overrides, workspace, reporter)
    last: dict[str, Any] = {}

    def keep(report: dict[str, Any]) -> None:
        last.clear()
        last.update(report)

    _loop(recipe, every_s, overrides, workspace, reporter, stop, keep)
    return last


def watch_once(recipe: RecipeLike, overrides: list[str] | None = None, workspace: str | Path | None = None,
               reporter: Reporter | None = None) -> dict[str, Any]:
    """One watch cycle; returns (and writes) the cycle report. Its news are ``message`` events of stage ``watch``."""
    recipe, ws = resolve_recipe(recipe, overrides), Workspace.at(workspace)
    inbox = recipe.watch.inbox
    if inbox is None or not inbox.is_dir():
        raise RecipeError(f"watch.inbox {'is not set' if inbox is None else f'{inbox} is not a folder'}",
                          hint="set watch.inbox in the recipe to the folder where new labelled files land")
    recipe.retrain_recipe()  # refused before any inbox file is taken in
    folder = ws.stage_dir(recipe.name, "watch")
    emit = emitter(reporter, "watch")

    def say(text: str) -> None:
        emit("message", text=text)

    with _state(folder / "state.db") as con:
        report: dict[str, Any] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "recipe": recipe.name}
        report["resumed_round"] = _finish_open_round(recipe, ws, con, folder, say, reporter)
        report["files"] = _ingest(recipe, inbox, con, folder, say)
        reach("watch.after_ingest")
        report |= _triggers(recipe, ws, con)
        if report["fired"]:
            round_id = _open_round(con, report["fired"])
            say(f"round {round_id}: retraining ({'; '.join(report['fired'])})")
            report["round"] = _run_round(recipe, ws, con, folder, round_id, say, reporter)
    write_json(folder / "reports" / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}.json", report)
    return report


def watch_loop(recipe: RecipeLike, every_s: float, overrides: list[str] | None = None, workspace: str | Path | None = None,
               reporter: Reporter | None = None, stop: threading.Event | None = None) -> int:
    """Run cycles every ``every_s`` seconds until SIGTERM/SIGINT (the running cycle finishes first); returns how many ran."""
    return _loop(recipe, every_s, overrides, workspace, reporter, stop, lambda _report: None)


def _loop(recipe: RecipeLike, every_s: float, overrides: list[str] | None, workspace: str | Path | None,
          reporter: Reporter | None, stop: threading.Event | None, each: Callable[[dict[str, Any]], None]) -> int:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    cycles = 0
    while not stop.is_set():
        each(watch_once(recipe, overrides, workspace, reporter))
        cycles += 1
        stop.wait(every_s)
    return cycles


# -- ingest ---------------------------------------------------------------------------------------------
def _ingest(recipe: Recipe, inbox: Path, con: sqlite3.Connection, folder: Path, say: Say) -> list[dict[str, Any]]:
    seen = {row[0] for row in con.execute("select checksum from files")}
    out = []
    for path in sorted(p for pattern in PATTERNS for p in inbox.glob(pattern)):
        checksum = hash_file(path)
        if checksum in seen:
            continue
        log = ProblemLog()
        rows = load_rows(recipe, path, log)
        if log.errors:
            _quarantine(folder, path, checksum, log)
        with con:  # the file and its rows land together or not at all
            con.execute("insert into files values (?, ?, ?, ?, ?)", (checksum, str(path), len(rows), len(log.errors), time.time()))
            con.executemany("insert into rows (checksum, data, holdout, round) values (?, ?, ?, null)",
                            [(checksum, json.dumps(_raw(r)), _is_holdout(r["text"], recipe.watch.holdout)) for r in rows])
        seen.add(checksum)
        out.append({"file": str(path), "accepted": len(rows), "quarantined": len(log.errors)})
        say(f"{path.name}: {len(rows)} rows accepted, {len(log.errors)} quarantined")
    return out


def _quarantine(folder: Path, path: Path, checksum: str, log: ProblemLog) -> None:
    dest = folder / "quarantine" / f"{path.name}.{checksum[:8]}.txt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(f"{p}\n" for p in log.errors))


def _raw(example: dict[str, Any]) -> dict[str, Any]:
    """A normalised example back in the plain field names the round's data files use (text, label, target; a chat
    conversation as its OpenAI row, with the transcript as ``text`` for the drift, holdout and leakage checks)."""
    if "messages" in example:
        last = {"role": "assistant", "content": example["target"], "weight": example["weight"]}
        return {"messages": [*example["messages"], last], "text": example["text"]}
    if "output" in example:
        return {"text": example["text"], "target": example["output"]}
    if "references" in example:
        return {"text": example["text"], "target": example["references"]}
    return {"text": example["text"], "label": example.get("labels", example["label"])}


def _is_holdout(text: str, share: float) -> int:
    """Deterministic by text (case and spacing ignored, as the leakage check does): a rerun holds out the same rows,
    and two copies of one text never land on both sides."""
    return int(zlib.crc32(normalize_text(text).encode()) % 10_000 < share * 10_000)


# -- triggers -------------------------------------------------------------------------------------------
def _triggers(recipe: Recipe, ws: Workspace, con: sqlite3.Connection) -> dict[str, Any]:
    cfg = recipe.watch
    new = [json.loads(d) for (d,) in con.execute("select data from rows where round is null")]
    ref = _reference_rows(recipe, con)
    stats: dict[str, Any] = {"new_rows": len(new), "reference_rows": len(ref)}
    fired = []
    if len(new) >= cfg.min_new_rows:
        fired.append(f"{len(new)} new rows ≥ min_new_rows {cfg.min_new_rows}")
    if new and "label" in new[0]:
        shift = label_shift([_label(r) for r in ref], [_label(r) for r in new])
        stats["label_shift"] = shift
        fired += [f"new label {label!r} with {n} rows ≥ {cfg.new_label_min_rows}" for label, n in shift["new_labels"].items()
                  if n >= cfg.new_label_min_rows]
        if len(new) >= cfg.min_rows_for_tests and shift["p_value"] < cfg.label_shift_p and shift["psi"] > cfg.psi_threshold:
            fired.append(f"label shift: chi-square p={shift['p_value']:.2g} < {cfg.label_shift_p} and PSI {shift['psi']:.3f} > "
                         f"{cfg.psi_threshold}")
    if len(new) >= cfg.min_rows_for_tests:
        auc = text_drift_auc([r["text"] for r in ref], [r["text"] for r in new])
        stats["text_drift_auc"] = auc
        if auc > cfg.text_drift_auc:
            fired.append(f"text drift: AUC {auc:.3f} > {cfg.text_drift_auc}")
    if cfg.quality_floor is not None and len(new) >= cfg.min_rows_for_tests:
        quality = _champion_quality(recipe, ws, new)
        stats["champion_quality"] = quality
        if quality is not None and quality["value"] < cfg.quality_floor:
            fired.append(f"champion {quality['metric']} {quality['value']:.3f} on {quality['rows']} new rows "
                         f"< quality_floor {cfg.quality_floor}")
    thresholds = cfg.model_dump(mode="json", exclude={"inbox", "retrain"})
    return {"statistics": stats, "thresholds": thresholds, "fired": fired}


def _champion_quality(recipe: Recipe, ws: Workspace, new: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The champion's main metric on the new rows (before any retrain); None when nothing is champion yet."""
    client = registry_client(tracking_uri(recipe, ws))
    try:
        champ = by_alias(client, recipe.name, CHAMPION)
    except RegistryError:
        return None
    if champ is None:
        return None
    rows = recipe.with_overrides(_row_fields(recipe))
    examples = [e for e in (TASKS[rows.task.type].normalize(r, rows.task)[0] for r in new) if e is not None]
    metrics = score_examples(rows, resolve_base(recipe.model), adapter_path(client, champ), examples)
    metric = recipe.metric_names()[0]
    return {"version": champ.version, "metric": metric, "value": float(metrics[metric]), "rows": len(examples)}


def _label(row: dict[str, Any]) -> str:
    label = row["label"]
    return "; ".join(sorted(label)) if isinstance(label, list) else label


def _reference_rows(recipe: Recipe, con: sqlite3.Connection) -> list[dict[str, Any]]:
    """What the current model learned from: the recipe's train split plus rows of earlier rounds."""
    base = [_raw(r) for r in build_dataset(recipe).splits["train"]]
    return base + [json.loads(d) for (d,) in con.execute("select data from rows where round is not null and holdout = 0")]


# -- rounds ---------------------------------------------------------------------------------------------
def _open_round(con: sqlite3.Connection, fired: list[str]) -> int:
    with con:
        cur = con.execute("insert into rounds (status, triggers, at) values ('training', ?, ?)", (json.dumps(fired), time.time()))
        round_id = int(cur.lastrowid)
        con.execute("update rows set round = ? where round is null", (round_id,))
    return round_id


def _finish_open_round(recipe: Recipe, ws: Workspace, con: sqlite3.Connection, folder: Path, say: Say,
                       reporter: Reporter | None) -> dict[str, Any] | None:
    open_round = con.execute("select id from rounds where status = 'training' order by id limit 1").fetchone()
    if open_round is None:
        return None
    say(f"round {open_round[0]}: interrupted earlier; finishing it")
    return _run_round(recipe, ws, con, folder, int(open_round[0]), say, reporter)


def _run_round(recipe: Recipe, ws: Workspace, con: sqlite3.Connection, folder: Path, round_id: int, say: Say,
               reporter: Reporter | None) -> dict[str, Any]:
    """Retrain, register and gate (the caller's reporter sees the round's train and eval events too)."""
    retrain = _round_recipe(recipe, con, folder / f"round-{round_id}", round_id)
    version = _version_of_round(retrain, ws, round_id)
    if version is None:
        result = run(retrain, None, ws.root, reporter, tags={"watch.round": str(round_id)})
        decision, version = result.decision, result.model_version
    else:  # registered before a crash: decide it, never register it again
        decision = gate(retrain, version, ws.root, reporter)
    with con:
        con.execute("update rounds set status = 'done', version = ?, verdict = ? where id = ?", (version, decision.verdict, round_id))
    say(f"round {round_id}: version {version} — {decision.verdict}: {decision.reason}")
    return {"id": round_id, "version": version, "verdict": decision.verdict, "reason": decision.reason, "details": decision.details}


def _round_recipe(recipe: Recipe, con: sqlite3.Connection, folder: Path, round_id: int) -> Recipe:
    """The recipe of a retrain: its data = recipe train + new rows (train), recipe test + held-out new rows (frozen set).
    New rows that repeat a recipe row (case and spacing ignored) are left out: they would leak into the frozen set."""
    base = build_dataset(recipe).splits
    known = {normalize_text(r["text"]) for rows in base.values() for r in rows}  # re-sent recipe rows would leak into the frozen set
    new = [(json.loads(d), h) for d, h in con.execute("select data, holdout from rows where round <= ?", (round_id,))]
    new = [(r, h) for r, h in new if normalize_text(r["text"]) not in known]
    files = {"train": [_raw(r) for r in base["train"]] + [r for r, h in new if not h],
             "test": [_raw(r) for r in base["test"]] + [r for r, h in new if h]}
    if base["valid"]:
        files["valid"] = [_raw(r) for r in base["valid"]]
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in files.items():
        write_jsonl(folder / f"{split}.jsonl", rows)
    data = [*(f"data.{s}={folder / f'{s}.jsonl'}" for s in files), "data.format=jsonl"]
    if "valid" not in files:
        data += ["data.valid=null", "data.split.valid=0"]
    retrain = recipe.with_overrides([*recipe.watch.retrain, *_row_fields(recipe), *data])
    if isinstance(recipe.task, ClassifyConfig) and recipe.task.labels is not None:  # a declared label set grows with new labels
        seen = {lab for r in files["train"] for lab in (r["label"] if isinstance(r["label"], list) else [r["label"]])}
        retrain.task.labels = [*recipe.task.labels, *sorted(seen - set(recipe.task.labels))]  # validated assignment (Section)
    return retrain


def _version_of_round(recipe: Recipe, ws: Workspace, round_id: int) -> str | None:
    try:
        versions = list_versions(registry_client(tracking_uri(recipe, ws)), recipe.name)
    except RegistryError:  # nothing registered yet
        return None
    return next((v.version for v in versions if v.tags.get("watch.round") == str(round_id)), None)
