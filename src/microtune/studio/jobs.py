"""Launch: pipeline steps as background processes, their progress streamed to the page, cancel, logs kept.

    jobs = Jobs(workspace, max_jobs=1)
    job = jobs.start("run", "support-router", ["train.epochs=1"])   # → Job(id="20260101-120000-0001", ...)
    jobs.progress(job.id)        # the newest step, loss, tokens/s, state
    jobs.cancel(job.id)          # SIGTERM to the job's process group

Each job runs ``python -m microtune.studio.worker`` (the pipeline functions, events as JSON lines) in its own
process group; its stdout goes to ``<workspace>/.studio/jobs/<id>/events.jsonl`` and stderr to ``log.txt``, both
kept after it ends. The recipe is the one the workspace already ran (the champion's ``recipe.json``, else the
newest adapter's or synth run's), so a launch needs no file from the browser; overrides are validated before the
process starts (a bad one is a clear error, nothing is launched). At most ``max_jobs`` run at once per workspace
(default 1: two trainings on one small machine would both crawl); the count includes jobs started by another
Studio on the same workspace (their pid is checked).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from microtune.core.errors import InputError
from microtune.core.workspace import Workspace, new_run_id
from microtune.studio import reading
from microtune.studio.worker import COMMANDS


class Busy(InputError):
    """The workspace already runs as many jobs as allowed."""


@dataclass
class Job:
    id: str
    command: str
    recipe: str
    overrides: list[str]
    pid: int
    started: float
    status: str = "running"  # running | finished | failed | cancelled
    returncode: int | None = None
    ended: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def recipe_file(ws: Workspace, recipe: str) -> Path:
    """The resolved recipe the workspace last ran for ``recipe``: champion's adapter, else newest adapter, else newest synth."""
    folder = reading.recipe_dir(ws, recipe)
    if recipe in reading.model_names(ws):
        champ = reading.score(ws, recipe).champion
        if champ:
            adapter = reading._inside(ws, reading.version_of(ws, recipe, champ).tags.get("adapter_dir"))
            if adapter is not None and (adapter / "recipe.json").is_file():
                return adapter / "recipe.json"
    for stage in ("adapters", "synthetic"):
        for run_id in reading.artifact_ids(ws, recipe, stage):
            if (folder / stage / run_id / "recipe.json").is_file():
                return folder / stage / run_id / "recipe.json"
    raise InputError(f"recipe {recipe!r} has no recipe.json in this workspace to launch from",
                     hint=f"run it once from the command line: `microtune run RECIPE.yaml -w {ws.root}`")


def launchable(ws: Workspace) -> list[str]:
    out = []
    for name in reading.recipe_names(ws):
        try:
            recipe_file(ws, name)
            out.append(name)
        except InputError:
            continue
    return out


def check_overrides(path: Path, overrides: list[str]) -> None:
    """Every override applied to the recipe now, so a typo is an error on the page, not a failed job."""
    from microtune.config import artifact_recipe

    artifact_recipe(path).with_overrides(overrides)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Jobs:
    def __init__(self, ws: Workspace, max_jobs: int = 1, python: str | None = None):
        if max_jobs < 1:
            raise InputError(f"--max-jobs must be at least 1, got {max_jobs}", hint="pass --max-jobs 1 (the default) or more")
        self.ws, self.max_jobs, self.python = ws, max_jobs, python or sys.executable
        self.root = ws.root / ".studio" / "jobs"
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # -- lookups ---------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if (p / "job.json").is_file()), reverse=True)

    def folder(self, job_id: str) -> Path:
        for known in self.ids():
            if known == job_id:
                return self.root / known
        raise reading.NotFound(f"no job {job_id[:40]!r} in this workspace", hint="the jobs are listed on /launch")

    def get(self, job_id: str) -> Job:
        folder = self.folder(job_id)
        job = Job(**json.loads((folder / "job.json").read_text()))
        return self._refresh(job, folder)

    def all(self) -> list[Job]:
        return [self.get(i) for i in self.ids()]

    def running(self) -> list[Job]:
        return [j for j in self.all() if j.status == "running"]

    # -- state -----------------------------------------------------------------------------------
    def _save(self, job: Job, folder: Path) -> None:
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job)))
        tmp.replace(folder / "job.json")

    def _refresh(self, job: Job, folder: Path) -> Job:
        """A running job whose process ended becomes finished / failed (its last event says which)."""
        if job.status != "running":
            return job
        proc = self._procs.get(job.id)
        code = proc.poll() if proc is not None else (None if _alive(job.pid) else -1)
        if code is None:
            return job
        events = read_events(folder)
        last = events[-1] if events else {}
        job.returncode, job.ended = code, time.time()
        job.status = "finished" if code == 0 and last.get("kind") == "result" else "failed"
        job.result = {k: v for k, v in last.items() if k not in ("t", "kind")} if last.get("kind") in ("result", "error") else {}
        with self._lock:
            self._save(job, folder)
            self._procs.pop(job.id, None)
        return job

    # -- actions ---------------------------------------------------------------------------------
    def start(self, command: str, recipe: str, overrides: list[str]) -> Job:
        if command not in COMMANDS:
            raise InputError(f"unknown command {command[:30]!r}", hint=f"one of: {', '.join(COMMANDS)}")
        path = recipe_file(self.ws, recipe)
        overrides = [o.strip() for o in overrides if o.strip()]
        check_overrides(path, overrides)
        with self._lock:
            busy = [j for j in self.running()]
            if len(busy) >= self.max_jobs:
                raise Busy(f"{len(busy)} job(s) already running in this workspace ({', '.join(j.id for j in busy)}); at most "
                           f"{self.max_jobs} at once", hint="wait for it, cancel it, or start the Studio with a higher --max-jobs")
            job_id = self._new_id()
            folder = self.root / job_id
            folder.mkdir(parents=True)
            args = [self.python, "-m", "microtune.studio.worker", command, str(self.ws.root), str(path)]
            for item in overrides:
                args += ["--set", item]
            with (folder / "events.jsonl").open("wb") as out, (folder / "log.txt").open("wb") as log:
                proc = subprocess.Popen(args, stdout=out, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                        cwd=str(self.ws.root), env=_worker_env())
            job = Job(job_id, command, recipe, overrides, proc.pid, time.time())
            self._procs[job_id] = proc
            self._save(job, folder)
        return job

    def _new_id(self) -> str:
        base = new_run_id()
        taken, n = set(self.ids()), 1
        job_id = base
        while job_id in taken:
            n += 1
            job_id = f"{base}-{n}"
        return job_id

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status != "running":
            return job
        try:
            os.killpg(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc = self._procs.get(job.id)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                proc.wait()
        job.status, job.ended, job.returncode = "cancelled", time.time(), proc.returncode if proc is not None else None
        with self._lock:
            self._save(job, self.folder(job_id))
            self._procs.pop(job.id, None)
        return job

    def progress(self, job_id: str) -> dict[str, Any]:
        """What the job's page shows: its state, the newest figures of each stage, the recent messages, the log tail."""
        job = self.get(job_id)
        folder = self.folder(job_id)
        events = read_events(folder)
        stages: dict[str, dict[str, Any]] = {}
        messages, losses = [], []
        for e in events:
            if "stage" in e:
                s = stages.setdefault(e["stage"], {"stage": e["stage"]})
                if e.get("total"):
                    s["total"] = e["total"]
                if e.get("step") is not None:
                    s["step"] = e["step"]
                s.update({k: v for k, v in (e.get("data") or {}).items() if isinstance(v, (int, float)) and k != "text"})
                if e["kind"] == "done":
                    s["done"] = True
                if e["kind"] == "message" and (e.get("data") or {}).get("text"):
                    messages.append(e["data"]["text"])
                if e["stage"] == "train" and e["kind"] == "progress" and "loss" in (e.get("data") or {}):
                    losses.append((e["step"], e["data"]["loss"]))
        log = (folder / "log.txt").read_text(encoding="utf-8", errors="replace") if (folder / "log.txt").is_file() else ""
        return {"job": job, "stages": list(stages.values()), "messages": messages[-12:], "losses": losses, "events": len(events),
                "log": log[-4000:]}


def _worker_env() -> dict[str, str]:
    """The job imports the same microtune as the Studio (its package folder first on PYTHONPATH), unbuffered."""
    here = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def read_events(folder: Path) -> list[dict[str, Any]]:
    path = folder / "events.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the line being written right now
                continue
    return out
