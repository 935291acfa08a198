"""What a trained artifact records about where it came from: base model, data, recipe, code and library versions."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

from microtune.config import Recipe
from microtune.core.hashing import hash_text, hash_value
from microtune.core.version import __version__
from microtune.training.defaults import checkpointing


def lineage(recipe: Recipe, ref: Any, dataset: dict[str, Any], adapter_dir: Path) -> dict[str, Any]:
    """The adapter's lineage: enough to tell two artifacts apart and to reproduce one."""
    import peft  # heavy: imported only once a model was trained (torch is loaded by then anyway)
    import torch
    import transformers

    template = adapter_dir / "chat_template.jinja"
    return {
        **ref.lineage(),
        "dataset_hash": dataset["dataset_hash"],
        "recipe_hash": recipe_hash(recipe),
        "chat_template_hash": hash_text(template.read_text()) if template.is_file() else None,
        "microtune_version": __version__,
        "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "seed": recipe.train.seed,
    }


NOT_HASHED = ("tune",)  # sections that never change what one training run produces (the search space of `tune`)
# keys of other sections that never change it either: how classify answers are picked among the labels (the weights are
# the same whichever scorer reads them), and where a run is mirrored (W&B, TensorBoard); leaving them out also keeps every
# recipe's hash what it was before the keys existed
NOT_HASHED_KEYS = (("task", "scoring"), ("tracking", "backends"), ("tracking", "wandb"), ("model", "quantized_cache"))


def recipe_hash(recipe: Recipe) -> str:
    """The hash of the resolved recipe without the sections that do not change a run's result: what makes two training
    runs the same run (``train --resume`` checks it, lineage records it, a rerun finds an interrupted promotion by it).
    Stages hash the recipe as written (`auto` training settings unchosen: the data, hashed apart, decides them).
    The mirror keys are left out too, so adding TensorBoard to a run being resumed is the same run."""
    resolved = {k: v for k, v in recipe.resolved().items() if k not in NOT_HASHED}
    if resolved["train"].get("gradient_checkpointing") == "auto":  # as the method resolves it: a recipe's hash is what it was
        resolved["train"]["gradient_checkpointing"] = checkpointing(recipe.method.kind).value  # before the key had `auto`
    for section, key in NOT_HASHED_KEYS:
        if isinstance(resolved.get(section), dict):
            resolved[section] = {k: v for k, v in resolved[section].items() if k != key}
    return hash_value(resolved)


def git_commit() -> str | None:
    """The commit of the working directory's git checkout, if there is one (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
