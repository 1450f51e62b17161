"""The package layout: imports between parity's subpackages point one way (engine below the trainer side)."""

from __future__ import annotations

import ast
from pathlib import Path

import parity

PACKAGE = Path(parity.__file__).parent
# What each subpackage may import. The engine stands below everything that trains, diagnoses or serves.
ALLOWED = {
    "precision": set(),
    "kernels": {"precision"},
    "models": {"kernels", "precision"},
    "engine": {"models", "kernels", "precision"},
    "testing": {"models"},
    "trainer": {"engine", "models", "kernels", "precision"},
    "distributed": {"engine", "models", "kernels", "precision"},
    "train": {"trainer", "engine", "models", "kernels", "precision", "testing"},
    "diagnostics": {"train", "trainer", "engine", "models", "kernels", "precision", "testing"},  # train: W&B tracking
    "integrations": {"trainer", "server", "engine", "models", "kernels", "precision", "distributed"},
    "server": {"engine", "models", "kernels", "precision"},
    "cli": {"server", "train", "trainer", "diagnostics", "engine", "models", "kernels", "precision", "testing", "distributed"},
}


def _subpackage_imports() -> dict[str, set[str]]:
    """Subpackage -> the parity subpackages its modules import (top-level, function-level and TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:  # parity/__init__.py: the public API re-exports
            continue
        own = parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "parity" and len(bits) > 1 and bits[1] != own:
                    graph.setdefault(own, set()).add(bits[1])
    return graph


def test_every_subpackage_is_placed():
    present = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert present <= set(ALLOWED), f"add {sorted(present - set(ALLOWED))} to the layout"


def test_imports_point_down():
    graph = _subpackage_imports()
    wrong = {pkg: sorted(deps - ALLOWED[pkg]) for pkg, deps in graph.items() if deps - ALLOWED[pkg]}
    assert not wrong, f"imports against the layout: {wrong}"


def test_no_import_cycles():
    graph = _subpackage_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(pkg for pkg in graph if reaches(pkg, pkg, {pkg}))
    assert not cycles, f"subpackages on an import cycle: {cycles}"


def test_engine_imports_no_trainer_side_package():
    deps = _subpackage_imports().get("engine", set())
    assert not deps & {"trainer", "train", "diagnostics", "cli", "integrations", "distributed", "testing"}, deps
