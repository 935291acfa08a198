"""Named crash points: where a test may make the process die as ``kill -9`` would, to prove a rerun recovers.

    reach("train.after_checkpoint")      # a no-op unless $MICROTUNE_CRASH_AT names this point

``MICROTUNE_CRASH_AT=POINT`` kills the process (SIGKILL: no ``finally``, no atexit, no flush) the first time
``POINT`` is reached; ``POINT@N`` the N-th time (e.g. the second checkpoint). Why a hook rather than a timer:
a timed kill lands somewhere different on every machine; a named point lands exactly between the two writes
whose order matters, so each cell of the crash matrix (tests/integration/test_crash_matrix.py) tests one
recovery path, every time. The variable is read once at import: unset, ``reach`` is one comparison.

``POINTS`` is the one table of points; the matrix test asserts each one is reached by some cell, so a point
that is moved, renamed or removed cannot silently stop being tested.
"""
from __future__ import annotations

import os
import signal

ENV = "MICROTUNE_CRASH_AT"

POINTS: dict[str, str] = {
    "atomic.before_rename": "core/atomic.py atomic_dir: the temp folder is complete, the rename into place has not happened",
    "atomic.file_before_rename": "core/atomic.py atomic_file: the temp file is written and fsynced, not yet renamed",
    "tracking.run_started": "registry/tracking.py mlflow_run: an MLflow run is RUNNING (owner tags set), its body has not run",
    "train.after_checkpoint": "training/checkpoint.py: a checkpoint step-N/ is in place, training goes on",
    "train.after_artifact": "pipeline/train.py: adapters/<run>/ is written, the MLflow run has not logged it or ended",
    "synth.after_answers": "synthesis/stage.py: every teacher answer is in synth-cache.sqlite, nothing filtered or written",
    "eval.after_predictions": "evaluation/runner.py: every system has predicted, no eval file is written",
    "run.before_register": "pipeline/run.py: the adapter and its eval are written, no model version exists yet",
    "gate.before_promote": "pipeline/gate.py: the decision is written (file and version tags), the champion alias not moved",
    "registry.before_alias": "registry/models.py promote: tags are set on the version, the champion alias is not",
    "watch.after_ingest": "pipeline/watch.py: inbox files and rows are in the state DB, triggers not evaluated, no round opened",
}


def _target(value: str | None) -> tuple[str, int] | None:
    """``POINT`` or ``POINT@N`` → (point, n); an unknown point is an error at start-up, not a crash that never comes."""
    if not value:
        return None
    point, _, nth = value.partition("@")
    if point not in POINTS:
        raise ValueError(f"${ENV}={value!r} names no crash point; known: {', '.join(sorted(POINTS))}")
    if nth and not (nth.isdigit() and int(nth) >= 1):
        raise ValueError(f"${ENV}={value!r}: the count after @ must be a whole number ≥ 1, e.g. {point}@2")
    return point, int(nth or 1)


_TARGET = _target(os.environ.get(ENV))
_seen = 0


def reach(point: str) -> None:
    """Die here by SIGKILL when $MICROTUNE_CRASH_AT names ``point`` (and this is its N-th reach); else do nothing."""
    global _seen
    if _TARGET is None or _TARGET[0] != point:
        return
    _seen += 1
    if _seen >= _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
