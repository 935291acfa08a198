"""microtune: turn a small open LLM into a task-specific micro-model.

    import microtune
    result = microtune.run("recipes/banking-intents.yaml")
    print(result.metrics["micro"]["accuracy"])

The stages are plain functions (``check``, ``train``, ``evaluate``, ``run``); the CLI is a shell over them.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "check", "evaluate", "run", "train"]


def __getattr__(name: str) -> Any:  # lazy: `import microtune` stays fast, torch loads only when needed
    if name in ("check", "train", "evaluate", "run", "register"):
        from microtune import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
