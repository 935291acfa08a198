"""The dependency direction of DESIGN.md holds: cli → pipeline → stages → shared layers → config/core."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "microtune"
FLOOR = {"core": 0, "config": 1, "data": 3, "tasks": 2, "models": 3, "registry": 3,
         "synthesis": 4, "training": 3, "evaluation": 4, "serving": 4, "pipeline": 4, "cli": 5}
STAGES = {"synthesis", "training", "evaluation", "serving"}


def _room(path: Path) -> str:
    rel = path.relative_to(SRC).parts
    return rel[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "microtune" and len(parts) > 1:
                rooms.add(parts[1])
    return rooms


def test_no_module_reaches_up_or_across_stages() -> None:
    bad = []
    for path in SRC.rglob("*.py"):
        room = _room(path)
        if room not in FLOOR:
            continue
        for target in _imports(path) - {room}:
            if target not in FLOOR:
                continue
            if FLOOR[target] > FLOOR[room] or (room in STAGES and target in STAGES) or \
                    (FLOOR[target] == FLOOR[room] and room in ("core", "config")):
                bad.append(f"{path.relative_to(SRC)} imports microtune.{target}")
    assert not bad, "\n".join(bad)
