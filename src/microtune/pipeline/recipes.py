"""What every step accepts as a recipe: a YAML path or a ``Recipe`` object, with ``a.b=value`` overrides.

    recipe = resolve_recipe("recipes/banking-intents.yaml", ["train.epochs=1"])
    same = resolve_recipe(recipe)                          # a Recipe passes through
"""
from __future__ import annotations

import json
from pathlib import Path

from microtune.config import Recipe, load_recipe

RecipeLike = str | Path | Recipe


def resolve_recipe(recipe: RecipeLike, overrides: list[str] | None = None) -> Recipe:
    """The validated recipe: loaded from its YAML (overrides applied before validation) or a Recipe with overrides."""
    if isinstance(recipe, Recipe):
        return recipe.with_overrides(overrides or [])
    return load_recipe(recipe, overrides)


def recipe_json(recipe: Recipe) -> str:
    """The resolved recipe as the ``recipe.json`` every trained or generated artifact carries (eval and serve reload it)."""
    return json.dumps(recipe.resolved(), indent=2, default=str) + "\n"
