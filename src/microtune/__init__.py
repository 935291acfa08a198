"""microtune: turn a small open LLM into a task-specific micro-model.

    import microtune
    result = microtune.run("recipes/banking-intents.yaml")
    print(result.metrics["micro"]["accuracy"])

The steps are plain functions (``check``, ``synth``, ``train``, ``evaluate``, ``register``, ``run``,
``report``, ``export``, ``serve``, ``watch``, ``predict``) and so are the registry verbs (``list_models``,
``list_versions``, ``show_version``, ``promote``, ``rollback``); the CLI is a shell over them. Long
steps take ``reporter=`` (see ``microtune.core.progress``): the library itself never prints.
"""
from __future__ import annotations

from typing import Any

from microtune.core.version import __version__

# The public functions live in microtune.pipeline. They are looked up on first use (PEP 562), so
# `import microtune` stays fast and never loads torch; no subpackage carries one of these names, so
# importing a subpackage can never replace a function by a module.
_PIPELINE = ("check", "synth", "train", "evaluate", "register", "run", "report", "export", "serve", "watch", "predict",
             "list_models", "list_versions", "show_version", "promote", "rollback")
__all__ = ["__version__", *_PIPELINE]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE:
        from microtune import pipeline  # the public face of the pipeline layer: lazy for startup speed only

        return getattr(pipeline, name)
    raise AttributeError(f"module 'microtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PIPELINE})
