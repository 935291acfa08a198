"""The base of every recipe section: pydantic, unknown keys forbidden, assignments validated.

Task and method modules define their own sections on it (``microtune.tasks``, ``microtune.methods``);
``microtune.config`` assembles them into the recipe.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
