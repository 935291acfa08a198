"""What a user installs: the wheel builds, carries what the code reads at run time, installs into a fresh venv, and
`microtune --help` runs from it; every third-party module the code imports is a declared dependency."""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

import microtune

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(microtune.__file__).resolve().parent
STDLIB = set(sys.stdlib_module_names)


def _declared() -> set[str]:
    """Distribution names (normalised) of the project's dependencies, the run-time ones only."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - STDLIB - {"microtune", "__future__"}


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """A module imported by the code but reached only through another package's dependencies breaks when that package
    drops it; optional ones (imported inside a function with a clear error, e.g. an extra) are listed here by name."""
    optional = {"datasets", "pyarrow", "wandb", "tensorboard", "torch_tb_profiler", "selenium", "llama_cpp"}
    providers = md.packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_imported_top_levels() - optional):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {missing}"


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_its_cli_runs(tmp_path: Path) -> None:
    """Build the wheel (hatchling, no network), check it carries the bundled recipes and the package data, install it
    into a new venv without dependencies, lend that venv this one's site-packages (so no download is needed; the
    editable install of the checkout is not visible from there), and run the installed console script."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True)
    wheel = next(dist.glob("microtune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "microtune/cli.py" in names and "microtune/_recipes/banking-intents.yaml" in names
    assert any(n.startswith("microtune/_recipes/data/") and n.endswith(".jsonl") for n in names)
    packaged = {p.relative_to(SRC.parent).as_posix() for p in SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert packaged <= set(names), f"files of the package missing from the wheel: {sorted(packaged - set(names))[:5]}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "lend-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout's src/ must not shadow the wheel
    where = subprocess.run([str(py), "-c", "import microtune; print(microtune.__file__)"], check=True, capture_output=True, text=True, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    shown = subprocess.run([str(venv / "bin" / "microtune"), "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert shown.returncode == 0, shown.stderr
    for command in ("check", "train", "eval", "run", "serve", "export", "watch", "tune"):
        assert command in shown.stdout
