"""One tree of errors, each carrying the fix. Only the CLI turns them into text and exit codes.

Every error says what came in, where (field path or file:line) and how to fix it. Data and recipe
errors collect *all* problems before raising, so a user fixes a file in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One problem at one place: ``where`` is ``file:line`` or a recipe path like ``train.lr``."""

    where: str
    message: str
    got: str | None = None
    severity: str = "error"  # "error" blocks the stage; "warning" is reported and lets it go on

    def __str__(self) -> str:
        got = f" (got {self.got})" if self.got is not None else ""
        return f"{self.where}: {self.message}{got}"


class MicrotuneError(Exception):
    """Base of every error microtune raises on purpose. ``exit_code`` 2 means bad input."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, problems: list[Problem] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems = list(problems or [])

    def __str__(self) -> str:
        lines = [self.message, *(f"  {p}" for p in self.problems)]
        if self.hint:
            lines.append(f"fix: {self.hint}")
        return "\n".join(lines)


class InputError(MicrotuneError):
    """The user handed us something we cannot use (recipe, data file, path, option)."""

    exit_code = 2


class RecipeError(InputError):
    """The recipe YAML is malformed or has invalid fields."""


class DataError(InputError):
    """A data file is missing, unreadable or has bad rows."""


class ModelError(InputError):
    """A base model or adapter cannot be found or loaded."""


class ArtifactError(InputError):
    """A stage's input artifact is missing or does not match what the stage needs."""


class TeacherError(InputError):
    """The synthetic-data teacher endpoint is not set up, unreachable, or refuses every request."""


@dataclass
class ProblemLog:
    """Collects problems while scanning, so every one is reported at once."""

    problems: list[Problem] = field(default_factory=list)

    def error(self, where: str, message: str, got: object = None) -> None:
        self.problems.append(Problem(where, message, _show(got), "error"))

    def warn(self, where: str, message: str, got: object = None) -> None:
        self.problems.append(Problem(where, message, _show(got), "warning"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def _show(value: object, limit: int = 80) -> str | None:
    if value is None:
        return None
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
