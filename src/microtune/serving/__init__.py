"""`microtune serve`: micro-models of every method on one base model behind one OpenAI-compatible API.

    microtune serve --adapter intents=.microtune/intents/adapters/RUN --port 8000
    microtune serve                      # every model in the workspace's MLflow registry, by name

    from microtune.serving import ServeSettings, build_app, serve
    serve(ServeSettings(adapters={"intents": Path("adapter/")}))

``build_app`` checks everything a user can get wrong (adapter folders, base model, registry) before
a port is opened, then returns the FastAPI app; the base model's weights load in the background
(requests answer 503 until then).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microtune.serving.settings import ServeSettings, parse_adapter_options, read_api_keys

if TYPE_CHECKING:
    from microtune.serving.engine import Engine

log = logging.getLogger("microtune.serving")
DEFAULT_BASE = "smollm2-135m-instruct"


def build_app(settings: ServeSettings, api_keys: list[str] | None = None, engine_class: type[Engine] | None = None) -> Any:
    """The app for these settings; ``api_keys`` default: $MICROTUNE_API_KEYS plus ``settings.api_keys``.

    ``engine_class``: an ``Engine`` subclass to run instead of the engine itself (it takes the same arguments), for
    code that adds behaviour around batching or generation; the tests use one to hold a generation deterministically.
    The running service (engine, catalog, metrics) is ``app.state.service``."""
    from microtune.config import ModelConfig
    from microtune.models import load_tokenizer, resolve_base
    from microtune.serving.app import Service, create_app
    from microtune.serving.catalog import Catalog
    from microtune.serving.engine import Engine
    from microtune.serving.metrics import Metrics

    base = settings.base or _adapter_base(settings) or DEFAULT_BASE
    ref = resolve_base(ModelConfig(base=base))
    tokenizer = load_tokenizer(ref)
    catalog = Catalog(base, ref.path, settings.adapters, _registry(settings), settings.qlora_base)
    metrics = Metrics()
    engine = (engine_class or Engine)(settings, catalog, tokenizer, ref, metrics)
    keys = list(api_keys) if api_keys is not None else [*read_api_keys(None), *settings.api_keys]
    return create_app(Service(settings, catalog, engine, metrics, keys))


def serve(settings: ServeSettings, api_keys: list[str] | None = None) -> None:
    """Build the app and run it with uvicorn until SIGINT/SIGTERM (in-flight requests finish first)."""
    run_app(build_app(settings, api_keys), settings)


def run_app(app: Any, settings: ServeSettings) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=int(settings.timeout_s) + 5)
    uvicorn.Server(config).run()


def _adapter_base(settings: ServeSettings) -> str | None:
    """The base model the first --adapter was trained on (read from its recipe)."""
    from microtune.config import artifact_recipe
    from microtune.core.artifacts import read_manifest

    if not settings.adapters:
        return None
    name, folder = next(iter(settings.adapters.items()))
    read_manifest(folder, "adapter")
    return artifact_recipe(Path(folder) / "recipe.json").model.base


def _registry(settings: ServeSettings) -> Any:
    """The registry to resolve model names in, or None (turned off, or a workspace store that does not exist)."""
    from microtune.core.workspace import DEFAULT_ROOT, Workspace
    from microtune.registry.tracking import given_uri, store_uri
    from microtune.serving.catalog import RegistryReader

    if not settings.registry:
        return None
    ws = Workspace(Path(settings.workspace or DEFAULT_ROOT).expanduser().resolve())  # not Workspace.at: serving creates no folder
    if given_uri(settings.tracking_uri) is None and not ws.mlflow_db.is_file():
        log.info("no MLflow store at %s: serving the --adapter folders and the base model only", ws.mlflow_db)
        return None
    return RegistryReader(store_uri(ws, settings.tracking_uri))


__all__ = ["DEFAULT_BASE", "ServeSettings", "build_app", "parse_adapter_options", "read_api_keys", "run_app", "serve"]
