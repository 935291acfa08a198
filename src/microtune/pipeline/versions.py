"""Reading the model registry: registered micro-models, their versions, one version in full.

    list_models()                         # [RegisteredModel(name="banking-intents", versions=3, champion="2"), ...]
    list_versions("banking-intents")      # newest first, with aliases, metrics and tags
    show_version("banking-intents")       # the champion (or a given version)

The store is ``$MLFLOW_TRACKING_URI`` when set, else the workspace's (as `microtune models` reads it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microtune.core.workspace import Workspace
from microtune.registry import models as registry
from microtune.registry.tracking import store_uri


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    versions: int
    champion: str | None  # the version behind the `champion` alias, if any


def registry_at(workspace: str | Path | None = None) -> Any:
    """The registry client of the store `microtune models` uses: ``$MLFLOW_TRACKING_URI``, else the workspace's."""
    return registry.registry_client(store_uri(Workspace.at(workspace)))


def list_models(workspace: str | Path | None = None) -> list[RegisteredModel]:
    """Every registered micro-model, by name."""
    client = registry_at(workspace)
    out = []
    for m in sorted(client.search_registered_models(), key=lambda m: m.name):
        aliases = getattr(m, "aliases", {}) or {}  # search results may omit aliases
        champion = aliases.get(registry.CHAMPION)
        out.append(RegisteredModel(m.name, len(client.search_model_versions(f"name='{m.name}'")),
                                   None if champion is None else str(champion)))
    return out


def list_versions(name: str, workspace: str | Path | None = None) -> list[registry.Version]:
    """Every version of model ``name``, newest first; an unknown name is an error listing the known ones."""
    return registry.list_versions(registry_at(workspace), name)


def show_version(name: str, version: str | int | None = None, workspace: str | Path | None = None) -> registry.Version:
    """One version with its aliases, metrics, lineage tags and last gate decision; default: the champion."""
    client = registry_at(workspace)
    if version is not None:
        return registry.get_version(client, name, str(version))
    found = registry.by_alias(client, name, registry.CHAMPION)
    if found is None:
        raise registry.RegistryError(f"model {name!r} has no champion yet", hint=f"name a version: `microtune models show {name} 1`")
    return found
