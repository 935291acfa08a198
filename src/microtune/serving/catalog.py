"""Which micro-models the server answers for: adapter folders given on the command line, and the MLflow registry.

    catalog = Catalog(base_name, base_path, {"intents": Path("adapter/")}, RegistryReader(uri))
    spec = catalog.lookup("intents@champion")   # AdapterSpec, or BASE for the base model's own name

A model name is looked up, never used as a path: `name` (its `champion` alias, else its latest
version), `name@alias` or `name/version`, each part checked against a strict pattern first.
Registry answers are cached per model string; ``refresh()`` re-resolves them (hot reload when an
alias moves) and reports what changed.

Every method and every task type is served (``placement`` is the one rule, read from the method's capability flags
and the artifact's PEFT config): where a model runs decides which requests can share a forward pass.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import microtune.methods as methods
from microtune.config import Recipe, artifact_recipe
from microtune.core.artifacts import read_manifest
from microtune.core.errors import ArtifactError, MicrotuneError
from microtune.registry.models import parse_reference
from microtune.registry.tracking import quiet_mlflow_logs

log = logging.getLogger("microtune.serving")
BASE = "__base__"  # PEFT's name for "no adapter" rows in a mixed batch
MIXED, ALONE, OWN = "mixed", "alone", "own"  # where a model runs: see placement()
QUOTE = 60  # at most this many characters of a user-given value are quoted back in an error message


def quote(value: object, limit: int = QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never echoes a huge user value whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def placement(method: str, adapter_dir: Path, qlora_base: str = "full") -> str:
    """Where the server runs an artifact of ``method`` — the one rule (every method is servable, so `check` refuses none):

    - ``mixed``: a LoRA adapter on the shared base, its rows in mixed-adapter batches (PEFT ``adapter_names``): the
      methods with the ``mixed_batch`` capability (lora, rslora, and qlora — it IS a LoRA adapter — on the
      full-precision base unless ``qlora_base`` is ``4bit``);
    - ``alone``: another LoRA-type adapter (DoRA) on the shared base, a batch of its own with ``set_adapter``: PEFT
      refuses ``adapter_names`` rows naming a DoRA adapter, but a DoRA adapter merely loaded beside others is fine;
    - ``own``: a model instance of its own (``full``, IA3, prompt/prefix tuning — other PEFT types, which cannot be
      added to a LoRA ``PeftModel`` — and qlora on its 4-bit base)."""
    caps = methods.spec(method).capabilities
    if caps.full_model or (caps.quantized_base and qlora_base == "4bit"):
        return OWN
    if caps.mixed_batch:
        return MIXED
    config = adapter_dir / "adapter_config.json"
    peft_type = json.loads(config.read_text()).get("peft_type") if config.is_file() else None
    return ALONE if peft_type == "LORA" else OWN


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
    method: str = "lora"
    place: str = MIXED  # placement(): mixed, alone or own
    answers: tuple[str, ...] = ()  # what the constrained decoder picks among: task.decoder().candidates (labels, or label sets)
    scoring: str = "trie"  # how it picks among them: task.decoder().scoring, as the artifact's recipe.json says (what eval measured)

    @property
    def task(self) -> str:
        return self.recipe.task.type

    @property
    def fingerprint(self) -> str:
        return f"{self.name}/{self.version}" if self.version else f"{self.name}@path"


def load_spec(name: str, version: str | None, path: Path, base_path: str, base_of: Callable[[Any], str] | None = None,
              qlora_base: str = "full") -> AdapterSpec:
    """Read an adapter artifact's metadata and check this server can serve it on its base model.

    ``base_of`` maps the recipe's model section to the base's folder (default: ``resolve_base``, which hashes a GGUF:
    the catalog passes a cached one). A ``full`` model brings its own weights but must share the base's tokenizer
    (the server renders every prompt with one), so it too must name this server's base."""
    from microtune.models import resolve_base
    from microtune.tasks import get_task

    base_of = base_of or (lambda model: resolve_base(model).path)
    path = Path(path).resolve()
    manifest = read_manifest(path, "adapter")
    recipe = artifact_recipe(path / "recipe.json")
    method = manifest.get("method", "lora")
    if method not in methods.kinds():
        raise UnservableModel(f"model {quote(name)}: method {quote(method)} is not a method this microtune knows",
                              hint=f"serve artifacts of one of {methods.kinds()}")
    trained_on = base_of(recipe.model)
    if trained_on != base_path:
        raise UnservableModel(f"model {quote(name)} was trained on {recipe.model.base!r} ({trained_on}); this server's base is {base_path}",
                              hint="start a server with --base set to the adapter's base model")
    labels = tuple(manifest["labels"])
    decoder = get_task(recipe.task, list(labels)).decoder()
    return AdapterSpec(name, version, path, _key(path), recipe, labels, method, placement(method, path, qlora_base),
                       tuple(decoder.candidates or ()), decoder.scoring)


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
    def __init__(self, base_name: str, base_path: str, paths: dict[str, Path], registry: RegistryReader | None, qlora_base: str = "full"):
        self.base_name, self.base_path, self.registry, self.qlora_base = base_name, base_path, registry, qlora_base
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
        return load_spec(name, version, path, self.base_path, self._base_of, self.qlora_base)

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
        ref = parse_reference(model)  # the one reference grammar: NAME, NAME@ALIAS, NAME@vN, NAME/N
        if ref is None:
            raise UnknownModel(f"model {quote(model)} is not a valid model name", hint="use NAME, NAME@ALIAS, NAME@vN or NAME/N")
        if self.registry is None:
            raise UnknownModel(f"model {quote(model)} is not served here", hint=f"use one of {self.names()}")
        found = self.registry.version(*ref)
        if found is None:
            raise UnknownModel(f"model {quote(model)} is not in the registry", hint=f"use one of {self.names()}")
        version, source = found
        try:
            return self._load(ref[0], version, self.registry.local_path(source))
        except ArtifactError as exc:
            raise UnservableModel(f"model {quote(model)} version {version}: {exc.message}", hint=exc.hint) from None

    def refresh(self) -> list[str]:
        """Re-resolve registry names and re-read changed adapter folders; return one line per change."""
        changes = []
        with self._lock:
            resolved, paths = dict(self._resolved), dict(self._paths)
        for model, old in resolved.items():
            ref = parse_reference(model)
            found = self.registry.version(*ref) if self.registry and ref else None
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

