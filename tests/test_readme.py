"""Every `microtune …` command line shown in README.md and docs/ is parsed by the real CLI: a command or option
that does not exist (the README once showed `synth --base-url`) fails here. Placeholders (RECIPE, ADAPTER, OUT) parse
as values; `a|b|c` and `X | Y` alternatives are each checked."""
from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from typer.main import get_command

from microtune.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)


def _command_lines(page: Path) -> list[tuple[str, str]]:
    found = []
    for block in _blocks(page.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("microtune "):
                found.append((f"{page.name}: {line}", re.split(r"\s+#\s", line, maxsplit=1)[0].strip()))
    return found


def _variants(line: str) -> list[list[str]]:
    """Each alternative of a shown line: `X | Y` (whole-option alternatives) and `list|show` (word alternatives)."""
    head, *alternatives = [part.strip() for part in line.split(" | ")]
    stem = list(itertools.takewhile(lambda w: not w.startswith("-"), head.split()))  # `microtune cmd ARG` before its options
    lines = [head] + [" ".join([*stem, alt]) for alt in alternatives]  # `cmd ARG --a A | --b B`
    out = []
    for one in lines:
        words = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in shlex.split(one)]
        out += [list(choice) for choice in itertools.product(*words)]
    return out


CASES = [(where, args) for page in PAGES for where, line in _command_lines(page) for args in _variants(line)]


def _parse(args: list[str]) -> str:
    """Walk the command tree as click would, without running anything; returns the command reached. A missing required
    value is fine (a line like `models list|show|promote|rollback` is a map, not a full command); an unknown command or
    option, or an extra argument, fails."""
    command, parent, rest = get_command(app), None, args
    while True:
        try:
            ctx = command.make_context(command.name or "microtune", rest, parent=parent)
        except Exception as exc:
            if type(exc).__name__ in ("MissingParameter", "Exit"):  # a map line, or `--help` (click exits after printing it)
                return command.name
            raise
        if not hasattr(command, "get_command"):
            return command.name
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        sub = command.get_command(ctx, rest[0]) if rest else None
        assert sub is not None, f"no command {rest[:1]}"
        command, parent, rest = sub, ctx, rest[1:]


def test_the_pages_show_commands() -> None:
    assert len(CASES) > 20 and any(args[1] == "serve" for _, args in CASES)


@pytest.mark.parametrize(("where", "args"), CASES, ids=[f"{w[:60]}|{' '.join(a[1:3])}" for w, a in CASES])
def test_every_shown_command_parses(where: str, args: list[str]) -> None:
    assert args[0] == "microtune"
    _parse(args[1:])


def test_the_check_catches_an_option_the_cli_does_not_have() -> None:
    with pytest.raises(Exception, match="No such option: --base-url"):
        _parse(["synth", "RECIPE", "--base-url", "URL"])  # what the README once showed
    with pytest.raises(Exception, match="unexpected extra argument"):
        _parse(["check", "RECIPE", "EXTRA"])
    with pytest.raises(AssertionError, match="no command"):
        _parse(["modles", "list"])


CHEAP = {("check", "recipes/banking-intents.yaml"), ("recipe-schema",), ("models", "list")}  # seconds each, no training


@pytest.mark.slow
@pytest.mark.parametrize("args", sorted({tuple(a[1:]) for _, a in CASES} & CHEAP))
def test_the_cheap_shown_commands_run(args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    monkeypatch.chdir(ROOT)  # the pages' paths are relative to the repository
    workspace = ["-w", str(tmp_path / "ws")] if args[0] in ("check", "models") else []
    result = CliRunner().invoke(app, [*args, *workspace])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_the_cheap_commands_are_still_shown() -> None:
    assert CHEAP <= {tuple(a[1:]) for _, a in CASES}
