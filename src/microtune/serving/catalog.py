"""Which micro-models the server answers for: adapter folders given on the command line, and the MLflow registry.

    catalog = Catalog(base_name, base_path, {"intents": Path("adapter/")}, RegistryReader(uri))
    spec = catalog.lookup("intents@champion")   # AdapterSpec, or BASE for the base model's own name

A model name is looked up, never used as a path: `name` (its `champion` alias, else its latest
version), `name@alias` or `name/version`, each part checked against a strict pattern first.
Registry answers are cached per model string; ``refresh()`` re-resolves them (hot reload when an
alias moves) and reports what changed.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import Recipe, artifact_recipe
from microtune.core.artifacts import read_manifest
from microtune.core.errors import ArtifactError, MicrotuneError
from microtune.core.names import is_valid_name
from microtune.registry.tracking import quiet_mlflow_logs

log = logging.getLogger("microtune.serving")
BASE = "__base__"  # PEFT's name for "no adapter" rows in a mixed batch
SERVABLE_METHODS = set(methods.kinds_with("mixed_batch"))  # PEFT mixed-adapter batches: plain LoRA (not DoRA, IA3, prompt tuning, 4-bit bases)
SERVABLE_TASKS = {"classify"}
_REF = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z0-9_-]{1,64})|/(?P<version>[0-9]{1,9}))?$")


class UnknownModel(MicrotuneError):
    """The requested model is not served here (HTTP 404)."""


class UnservableModel(MicrotuneError):
    """The model exists but this server cannot serve it (HTTP 400)."""


@dataclass(frozen=True)
class AdapterSpec:
    """One servable micro-model version: where its adapter is and how to prompt and decode for it."""

    name: str
    version: str | None
    path: Path
    key: str  # the PEFT adapter name: unique per folder content, so a changed folder is a new adapter
    recipe: Recipe = field(repr=False)
    labels: tuple[str, ...]

    @property
    def task(self) -> str:
        return self.recipe.task.type

    @property
    def fingerprint(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@path"


def load_spec(name: str, version: str | None, path: Path, base_path: str, base_of: Callable[[Any], str] | None = None) -> AdapterSpec:
    """Read an adapter artifact's metadata and check this server can serve it on its base model.

    ``base_of`` maps the recipe's model section to the base's folder (default: ``resolve_base``, which hashes a GGUF:
    the catalog passes a cached one)."""
    from microtune.models import resolve_base

    base_of = base_of or (lambda model: resolve_base(model).path)
    path = Path(path).resolve()
    manifest = read_manifest(path, "adapter")
    recipe = artifact_recipe(path / "recipe.json")
    method = manifest.get("method", "lora")
    if method not in SERVABLE_METHODS:
        raise UnservableModel(f"model {name!r}: method {method!r} cannot share a base model in mixed batches",
                              hint="serve LoRA adapters, or `microtune export --merge` this one and serve the merged model as --base")
    if recipe.task.type not in SERVABLE_TASKS:
        raise UnservableModel(f"model {name!r}: task type {recipe.task.type!r} is not served yet", hint="serve classify micro-models")
    trained_on = base_of(recipe.model)
    if trained_on != base_path:
        raise UnservableModel(f"model {name!r} was trained on {recipe.model.base!r} ({trained_on}); this server's base is {base_path}",
                              hint="start a server with --base set to the adapter's base model")
    return AdapterSpec(name, version, path, _key(path), recipe, tuple(manifest["labels"]))


def _key(path: Path) -> str:
    """The PEFT adapter name of a folder's current content (a rewritten artifact gets a new manifest, so a new key)."""
    stamp = f"{path}:{(path / 'manifest.json').stat().st_mtime_ns}"
    return "m" + hashlib.sha1(stamp.encode()).hexdigest()[:16]


class RegistryReader:
    """Read-only view of the MLflow model registry: which version a name/alias points at, and its adapter folder."""

    def __init__(self, uri: str):
        quiet_mlflow_logs()
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def version(self, name: str, alias: str | None, version: str | None) -> tuple[str, str] | None:
        """``(version, source)`` or None when the registry has no such model, alias or version."""
        from mlflow.exceptions import MlflowException

        try:
            if version is not None:
                mv = self.client.get_model_version(name, version)
            elif alias is not None:
                mv = self.client.get_model_version_by_alias(name, alias)
            else:
                mv = self._champion_or_latest(name)
        except MlflowException:
            return None
        return (str(mv.version), mv.source) if mv is not None else None

    def _champion_or_latest(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            found = self.client.search_model_versions(f"name='{name}'")  # the name passed is_valid_name: no quote can get in
            return max(found, key=lambda mv: int(mv.version)) if found else None

    def local_path(self, source: str) -> Path:
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=self.uri))

    def names(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models())


class Catalog:
    def __init__(self, base_name: str, base_path: str, paths: dict[str, Path], registry: RegistryReader | None):
        self.base_name, self.base_path, self.registry = base_name, base_path, registry
        self._lock = threading.Lock()
        self._bases: dict[tuple[str, str | None], str] = {(base_name, None): base_path}
        self._paths = {name: self._load(name, None, path) for name, path in paths.items()}
        self._resolved: dict[str, AdapterSpec] = {}  # registry model string → spec

    def _base_of(self, model_cfg: Any) -> str:
        """Where an adapter's base model lives, resolved once per (base, revision): resolving hashes a GGUF file."""
        from microtune.models import resolve_base

        key = (model_cfg.base, model_cfg.revision)
        if key not in self._bases:
            self._bases[key] = resolve_base(model_cfg).path
        return self._bases[key]

    def _load(self, name: str, version: str | None, path: Path) -> AdapterSpec:
        return load_spec(name, version, path, self.base_path, self._base_of)

    def lookup(self, model: str) -> AdapterSpec | str:
        """The spec a model string names, or BASE; UnknownModel / UnservableModel otherwise."""
        if model == self.base_name:
            return BASE
        with self._lock:
            if model in self._paths:
                return self._paths[model]
            if model in self._resolved:
                return self._resolved[model]
        spec = self._from_registry(model)
        with self._lock:
            self._resolved.setdefault(model, spec)
            return self._resolved[model]

    def _from_registry(self, model: str) -> AdapterSpec:
        m = _REF.match(model)
        if m is None or not is_valid_name(m["name"]):
            raise UnknownModel(f"model {model!r} is not a valid model name", hint="use NAME, NAME@ALIAS or NAME/VERSION")
        if self.registry is None:
            raise UnknownModel(f"model {model!r} is not served here", hint=f"use one of {self.names()}")
        found = self.registry.version(m["name"], m["alias"], m["version"])
        if found is None:
            raise UnknownModel(f"model {model!r} is not in the registry", hint=f"use one of {self.names()}")
        version, source = found
        try:
            return self._load(m["name"], version, self.registry.local_path(source))
        except ArtifactError as exc:
            raise UnservableModel(f"model {model!r} version {version}: {exc.message}", hint=exc.hint) from None

    def refresh(self) -> list[str]:
        """Re-resolve registry names and re-read changed adapter folders; return one line per change."""
        changes = []
        with self._lock:
            resolved, paths = dict(self._resolved), dict(self._paths)
        for model, old in resolved.items():
            m = _REF.match(model)
            found = self.registry.version(m["name"], m["alias"], m["version"]) if self.registry and m else None
            if found is not None and found[0] == old.version:
                continue  # the alias still points at the version being served: nothing to read
            try:
                new, note = self._from_registry(model), ""
            except MicrotuneError as exc:  # the alias or version went away: forget it, later requests get 404
                new, note = None, exc.message
            if new is None or new.key != old.key:
                changes.append(f"{model}: {old.fingerprint} -> {new.fingerprint if new else note}")
                self._swap(self._resolved, model, new)
        for name, old in paths.items():
            if _key(old.path) == old.key:
                continue
            new = self._load(name, None, old.path)
            if new.key != old.key:
                changes.append(f"{name}: {old.path} changed on disk")
                self._swap(self._paths, name, new)
        for line in changes:
            log.info("reload %s", line)
        return changes

    def _swap(self, table: dict[str, AdapterSpec], model: str, spec: AdapterSpec | None) -> None:
        with self._lock:
            if spec is None:
                table.pop(model, None)
            else:
                table[model] = spec

    def names(self) -> list[str]:
        names = {self.base_name, *self._paths}
        if self.registry is not None:
            try:
                names |= set(self.registry.names())
            except Exception as exc:  # a registry that is down must not take the model list with it
                log.warning("registry listing failed: %s", exc)
        return sorted(names)

    def loaded_versions(self) -> dict[str, str]:
        with self._lock:
            return {m: s.fingerprint for m, s in {**self._resolved, **self._paths}.items()}

