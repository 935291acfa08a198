"""Registered micro-models: versions, the ``champion`` / ``challenger`` aliases, promotion and rollback.

    client = registry_client(uri)                  # sqlite:///.microtune/mlflow.db, or a server
    list_versions(client, "banking-intents")       # [Version(version="3", aliases=["champion"], ...), ...]
    promote(client, "banking-intents", "4", reason="gate: +0.031 macro_f1, p=0.004")
    rollback(client, "banking-intents")            # champion back to the version it replaced

Alias rules: ``champion`` is the version serving traffic; ``challenger`` the newest candidate that has
not been decided. Promoting a version removes ``challenger`` from it (a version is never both), and
records the replaced champion on the promoted version (tag ``previous_champion``) so ``rollback``
knows where to go. A version whose adapter files are gone is never made champion.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from microtune.core.crashpoints import reach
from microtune.core.errors import InputError
from microtune.core.names import is_valid_name

CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(InputError):
    """A model or version that does not exist, or an alias move that would break the rules above."""


@dataclass
class Version:
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    source: str
    run_id: str | None
    created: float

    @property
    def metrics(self) -> dict[str, float]:
        """The micro-model's metrics recorded at registration (tags ``metric.micro.<name>``)."""
        out = {}
        for key, value in self.tags.items():
            if key.startswith("metric.micro."):
                try:
                    out[key.removeprefix("metric.micro.")] = float(value)
                except ValueError:
                    continue
        return out


@dataclass
class Decision:
    """One promotion decision, written as JSON and as tags on the challenger version."""
    name: str
    challenger: str
    champion: str | None
    verdict: str  # "promote" | "reject"
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


def registry_client(uri: str) -> Any:
    from microtune.registry.tracking import _mlflow

    return _mlflow(uri).MlflowClient(tracking_uri=uri)


def list_versions(client: Any, name: str) -> list[Version]:
    """Every version of ``name``, newest first; an unknown name is an error listing the known ones."""
    model = _require_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():  # search results may omit aliases
        aliases.setdefault(str(version), []).append(alias)
    found = client.search_model_versions(f"name='{name}'")
    versions = [Version(name, str(v.version), sorted(aliases.get(str(v.version), [])), dict(v.tags or {}), v.source,
                        v.run_id, (v.creation_timestamp or 0) / 1000) for v in found]
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def get_version(client: Any, name: str, version: str) -> Version:
    for v in list_versions(client, name):
        if v.version == str(version):
            return v
    known = ", ".join(v.version for v in list_versions(client, name)) or "none"
    raise RegistryError(f"model {name!r} has no version {version!r}", hint=f"versions: {known} (`microtune models list {name}`)")


def by_alias(client: Any, name: str, alias: str) -> Version | None:
    return next((v for v in list_versions(client, name) if alias in v.aliases), None)


_REFERENCE = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z0-9_-]{1,64})|/(?P<version>[0-9]{1,9}))?$")
_VERSION_ALIAS = re.compile(r"^[vV](?P<version>[0-9]{1,9})$")  # MLflow reserves aliases of this form for version numbers


def parse_reference(text: str) -> tuple[str, str | None, str | None] | None:
    """``(name, alias, version)`` of ``name``, ``name@alias``, ``name@v3`` or ``name/3`` (as `microtune serve` names
    models); ``None`` when ``text`` is none of them or the name breaks the one naming rule (``core.names``)."""
    found = _REFERENCE.match(text)
    if found is None or not is_valid_name(found["name"]):
        return None
    alias, version = found["alias"], found["version"]
    numbered = _VERSION_ALIAS.match(alias or "")
    return (found["name"], None, numbered["version"]) if numbered else (found["name"], alias, version)


def resolve_reference(client: Any, name: str, alias: str | None = None, version: str | None = None) -> Version:
    """The version a reference names: that version, the alias's version, or (name alone) the champion, else the newest
    version — the rule `microtune serve` answers a bare name by."""
    if version is not None:
        return get_version(client, name, version)
    versions = list_versions(client, name)  # newest first; an unknown name is an error listing the known ones
    if not versions:
        raise RegistryError(f"model {name!r} has no versions", hint="register one: `microtune run RECIPE`")
    if alias is None:
        return by_alias(client, name, CHAMPION) or versions[0]
    found = by_alias(client, name, alias)
    if found is None:
        known = sorted({a for v in versions for a in v.aliases})
        raise RegistryError(f"model {name!r} has no alias {alias!r}",
                            hint=f"aliases: {', '.join(known) or 'none'}; or name a version, e.g. {name}@v{versions[0].version}")
    return found


def promote(client: Any, name: str, version: str, reason: str) -> Version:
    """Make ``version`` the champion; it stops being the challenger; the old champion is remembered."""
    target = get_version(client, name, version)
    if not artifact_exists(target.source):
        raise RegistryError(f"version {version} of {name!r} points at missing files: {target.source}",
                            hint="register a new version; a champion must be loadable")
    current = by_alias(client, name, CHAMPION)
    if current is not None and current.version == target.version:
        return target
    if current is not None:
        client.set_model_version_tag(name, target.version, "previous_champion", current.version)
    client.set_model_version_tag(name, target.version, "promoted_reason", reason[:5000])
    reach("registry.before_alias")
    client.set_registered_model_alias(name, CHAMPION, target.version)
    if CHALLENGER in target.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    return get_version(client, name, version)


def set_challenger(client: Any, name: str, version: str) -> None:
    target = get_version(client, name, version)
    if CHAMPION in target.aliases:
        raise RegistryError(f"version {version} of {name!r} is the champion; it cannot also be the challenger")
    client.set_registered_model_alias(name, CHALLENGER, target.version)


def clear_challenger(client: Any, name: str, version: str) -> None:
    """Drop the challenger alias if it still points at ``version`` (a decided candidate is no longer pending)."""
    current = by_alias(client, name, CHALLENGER)
    if current is not None and current.version == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)


def rollback(client: Any, name: str) -> Version:
    """Move ``champion`` back to the version the current champion replaced."""
    current = by_alias(client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"model {name!r} has no champion to roll back", hint=f"`microtune models promote {name} VERSION`")
    previous = current.tags.get("previous_champion")
    if not previous:
        raise RegistryError(f"champion version {current.version} of {name!r} replaced no earlier champion",
                            hint="there is nothing to roll back to; promote a version by hand instead")
    target = get_version(client, name, previous)
    if not artifact_exists(target.source):
        raise RegistryError(f"version {previous} of {name!r} points at missing files: {target.source}")
    client.set_model_version_tag(name, current.version, "rolled_back_at", str(int(time.time())))
    client.set_registered_model_alias(name, CHAMPION, target.version)
    return get_version(client, name, target.version)


def record_decision(client: Any, decision: Decision) -> None:
    tags = {"gate.verdict": decision.verdict, "gate.reason": decision.reason,
            "gate.champion": decision.champion or "none", "gate.at": str(int(decision.at))}
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.challenger, key, value[:5000])


def artifact_exists(source: str) -> bool:
    """Local sources (file paths, file:// URIs) must exist; remote stores are trusted to keep their artifacts."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path)).exists()
    return True


def adapter_path(client: Any, version: Version) -> Path:
    """A local folder with the version's adapter: the workspace copy when it still exists, else a download."""
    local = version.tags.get("adapter_dir")
    if local and Path(local).is_dir():
        return Path(local)
    if not artifact_exists(version.source):  # e.g. the workspace or its mlartifacts/ was deleted, or a copy is partial
        raise RegistryError(f"version {version.version} of {version.name!r} points at missing files: {version.source}"
                            + (f" (and its adapter_dir {local} is gone)" if local else ""),
                            hint="restore the workspace it was trained in, or register a new version and promote it "
                                 f"(`microtune models promote {version.name} VERSION`)")
    from microtune.registry.tracking import _mlflow

    mlflow = _mlflow(client._registry_uri if hasattr(client, "_registry_uri") else client.tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source))


def _require_model(client: Any, name: str) -> Any:
    import mlflow

    try:
        return client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model named {name!r}",
                            hint=f"registered: {', '.join(known) or 'none yet'} (`microtune run RECIPE` registers one)") from None
