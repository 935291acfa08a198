"""The serve step: micro-models and their base behind one OpenAI-compatible API, until SIGINT/SIGTERM (`microtune serve`).

    serve({"intents": ".microtune/intents/adapters/RUN"}, port=8000)       # blocks; Ctrl-C stops it
    serve(workspace=".microtune")                                            # every registered model, by name

Every ``ServeSettings`` field can be given as a keyword (``max_batch``, ``timeout_s``, ``poll_s``, …); an
unknown one is an error. API keys: ``api_keys``, plus ``$MICROTUNE_API_KEYS`` and ``api_key_file``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from microtune.core.errors import InputError, Problem
from microtune.core.progress import Reporter, emitter
from microtune.serving import ServeSettings, build_app, read_api_keys, run_app


def serve(adapters: dict[str, str | Path] | None = None, *, api_key_file: str | Path | None = None,
          reporter: Reporter | None = None, **settings: Any) -> None:
    """Check everything (adapters, base model, registry, keys), then serve until SIGINT/SIGTERM; in-flight requests finish."""
    chosen = serve_settings(adapters, api_key_file, **settings)
    app = build_app(chosen, chosen.api_keys)
    auth = f"{len(chosen.api_keys)} API key(s)" if chosen.api_keys else "no API key (anyone who can reach the port may call it)"
    emitter(reporter, "serve")("message", text=f"serving on http://{chosen.host}:{chosen.port}/v1 with {auth}; models: GET /v1/models")
    run_app(app, chosen)


def serve_settings(adapters: dict[str, str | Path] | None = None, api_key_file: str | Path | None = None,
                   **settings: Any) -> ServeSettings:
    """The validated settings; keys from ``$MICROTUNE_API_KEYS`` and ``api_key_file`` join ``api_keys``."""
    keys = read_api_keys(Path(api_key_file) if api_key_file is not None else None)
    settings["api_keys"] = [*keys, *settings.get("api_keys", [])]
    try:
        return ServeSettings(adapters=adapters or {}, **settings)
    except ValidationError as exc:
        problems = [Problem(".".join(str(x) for x in e["loc"]) or "<settings>", e["msg"],
                            None if e["loc"][:1] == ("api_keys",) else repr(e.get("input"))[:80])  # never echo a key
                    for e in exc.errors()]
        raise InputError("bad serve settings", problems=problems,
                         hint="see `microtune serve --help`; every keyword is a ServeSettings field") from None
