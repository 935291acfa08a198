"""A Studio job's process: one pipeline step for a workspace recipe, its progress events as JSON lines on stdout.

    python -m microtune.studio.worker run  WORKSPACE RECIPE_JSON [--set a.b=value ...]

The Studio starts this in its own process group (so cancel can end it and every child) and streams the lines to
the page. It calls the same pipeline functions as the CLI; the last line is ``{"kind": "result", ...}`` on success
or ``{"kind": "error", ...}`` with the message and the fix (exit 2 for bad input, as the CLI).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from microtune.core.errors import MicrotuneError
from microtune.core.progress import Event

COMMANDS = ("run", "train", "eval", "synth", "check")


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def reporter(event: Event) -> None:
    data = {k: v for k, v in event.data.items() if isinstance(v, (int, float, str, bool)) or v is None}
    _emit({"t": time.time(), "stage": event.stage, "kind": event.kind, "step": event.step, "total": event.total, "data": data})


def step(command: str, recipe: Any, overrides: list[str], workspace: Path) -> dict[str, Any]:
    from microtune import pipeline

    if command == "run":
        result = pipeline.run(recipe, overrides, workspace, reporter)
        verdict = result.decision.verdict if result.decision else None
        return {"adapter": result.adapter_dir.name, "eval": result.eval_dir.name, "version": result.model_version, "verdict": verdict}
    if command == "train":
        return {"adapter": pipeline.train(recipe, overrides, workspace, reporter).name}
    if command == "eval":
        return {"eval": pipeline.evaluate(recipe, overrides, workspace, reporter=reporter).name}
    if command == "synth":
        return {"synthetic": pipeline.synth(recipe, overrides, workspace, reporter).name}
    return {"dataset": pipeline.check(recipe, overrides, workspace).dataset_dir.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microtune.studio.worker")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("workspace", type=Path)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    from microtune.config import artifact_recipe

    _emit({"t": time.time(), "kind": "begin", "command": args.command, "overrides": args.overrides})
    try:
        out = step(args.command, artifact_recipe(args.recipe), args.overrides, args.workspace)
    except MicrotuneError as exc:
        _emit({"t": time.time(), "kind": "error", "message": exc.message, "problems": [str(p) for p in exc.problems], "hint": exc.hint})
        return exc.exit_code
    _emit({"t": time.time(), "kind": "result", **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
