"""`microtune studio`: the whole workspace in a browser — scoreboard, model versions and gate decisions, runs,
data, watch, a playground over the serving engine, and launching pipeline steps as background jobs.

    microtune studio -w .microtune                      # http://127.0.0.1:8765
    from microtune.studio import create_app             # the FastAPI app, e.g. for tests

Server-rendered (FastAPI + Jinja2, autoescaped), with two vendored front-end files (htmx, Chart.js) under
``static/vendor/``: no build step, no CDN, nothing fetched at run time. Guarded like `serve` (see ``security``).
This package sits on the CLI's floor: it reads through ``pipeline``/``registry``, answers through ``serving``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765


def create_app(workspace: str | Path | None = None, api_keys: list[str] | None = None, max_jobs: int = 1) -> Any:
    """The Studio's FastAPI app over ``workspace``; ``api_keys`` empty: no sign-in (bind 127.0.0.1 then)."""
    from microtune.studio.app import create_app as build

    return build(workspace, api_keys, max_jobs)


def run_studio(workspace: str | Path | None, host: str, port: int, api_keys: list[str], max_jobs: int = 1) -> None:
    import uvicorn

    uvicorn.run(create_app(workspace, api_keys, max_jobs), host=host, port=port, log_level="warning")


__all__ = ["DEFAULT_PORT", "create_app", "run_studio"]
