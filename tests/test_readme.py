"""Every parity import and dotted name the README documents resolves, so a moved module fails here first."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
FROM_IMPORTS = sorted(set(re.findall(r"^\s*from (parity[\w.]*) import ([\w, ]+)", README, flags=re.M)))
DOTTED = sorted(set(re.findall(r"\b(parity(?:\.\w+)+)", README)))


def _import(module: str):
    """The module, or a skip when it needs an optional dependency that is not installed (e.g. trl)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("parity"):
            pytest.skip(f"{module} needs {e.name}, not installed")
        raise


def test_the_readme_documents_imports():
    assert len(FROM_IMPORTS) >= 5 and len(DOTTED) >= 5


@pytest.mark.parametrize("module, names", FROM_IMPORTS)
def test_from_import(module, names):
    mod = _import(module)
    missing = [n.strip() for n in names.split(",") if not hasattr(mod, n.strip())]
    assert not missing, f"README: from {module} import {', '.join(missing)}"


@pytest.mark.parametrize("dotted", DOTTED)
def test_dotted_name(dotted):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that is a module, then attributes
        try:
            obj = _import(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"README names {dotted}: {'.'.join(parts[:cut])} has no {attr}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"README names {dotted}, which is not importable")
