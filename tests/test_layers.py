"""The dependency direction of DESIGN.md holds: cli → pipeline → stages → shared layers → config → methods/tasks → core; and no module
imports another that (directly or through others) imports it back. Imports inside functions count too: a
function-level import may keep startup fast, but it never makes a cycle acceptable."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "microtune"
ROOT = "microtune"  # the package's own __init__: `import microtune` / `from microtune import train` reach the pipeline
FLOOR = {"core": 0, "methods": 1, "tasks": 1, "config": 2, "data": 3, "models": 3, "registry": 3,
         "synthesis": 4, "training": 4, "evaluation": 4, "serving": 4, "pipeline": 5, "studio": 6, "cli": 6, "console": 6, ROOT: 6}
STAGES = {"synthesis", "training", "evaluation", "serving"}


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imported(path: Path) -> list[str]:
    """Dotted names this file imports, anywhere in it; ``from a import b`` gives ``a.b`` (a module or a name in ``a``)."""
    names = []
    for node in _nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module → the modules it imports (the deepest existing module a dotted name names), within the package."""
    files = {module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for target in _imported(path):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def test_no_module_reaches_up_or_across_stages() -> None:
    bad = []
    for module, targets in import_graph(SRC).items():
        room = _room(module)
        if room not in FLOOR:
            continue
        for target in {_room(t) for t in targets} - {room}:
            if target not in FLOOR:
                continue
            if FLOOR[target] > FLOOR[room] or (room in STAGES and target in STAGES) or \
                    (FLOOR[target] == FLOOR[room] and room in ("core", "methods", "tasks", "config")):
                bad.append(f"{module} imports microtune.{target}" if target != ROOT else f"{module} imports microtune itself")
    assert not bad, "\n".join(sorted(bad))


def test_the_package_root_is_imported_by_the_cli_layer_only() -> None:
    """`import microtune` / `from microtune import run` inside the library would climb back to the pipeline's public face."""
    users = sorted(m for m, targets in import_graph(SRC).items() if ROOT in targets and _room(m) not in ("cli", "console", ROOT))
    assert users == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph(SRC))
    assert found == [], "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in found)


def test_the_cycle_finder_sees_function_level_and_package_root_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from demo import sub\n    return sub\n")
    (pkg / "sub" / "__init__.py").write_text("from demo.sub.a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from demo.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import demo.sub.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import demo\n")
    (pkg / "lone.py").write_text("from demo import __version__\n")
    graph = import_graph(pkg)
    assert graph["demo.sub.b"] == {"demo.sub.a"}  # the TYPE_CHECKING import is not an edge
    assert graph["demo.lone"] == {"demo"}  # a name from the root package is an edge to the root
    assert cycles(graph) == [["demo.sub.a", "demo.sub.b"]]
    (pkg / "sub" / "b.py").write_text("import demo\n")  # b → root → sub → a → b
    assert cycles(import_graph(pkg)) == [["demo", "demo.sub", "demo.sub.a", "demo.sub.b"]]
