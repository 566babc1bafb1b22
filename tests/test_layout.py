"""The package layout's dependency direction (README, "Layout"), checked on the source.

Every ``import`` in ``bcr/`` and ``bcr_kernels/`` is read with ``ast`` (function-local ones too) and
each subpackage may import only those below it, so that a new back-edge fails here rather than
showing up later as an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# subpackage -> the subpackages of bcr it may import (besides itself)
ALLOWED = {
    "runtime": set(),
    "data": set(),
    "task": {"data"},
    "models": {"runtime"},
    "eval": {"data", "task", "models", "runtime"},
    "rl": {"data", "task", "models", "runtime", "eval"},
    "demo": {"data", "task", "models", "runtime", "eval", "rl"},
}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _bcr_subpackage(module: str) -> str | None:
    """``bcr.rl.trainer`` -> ``rl``; ``bcr`` itself (the lazy public names) -> ``""``."""
    parts = module.split(".")
    if parts[0] != "bcr":
        return None
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_subpackage_imports_only_those_below_it(package):
    bad = []
    for path in sorted((ROOT / "bcr" / package).rglob("*.py")):
        for line, module in _imported_modules(path):
            sub = _bcr_subpackage(module)
            if sub is None or sub == package:
                continue
            if sub == "" or sub not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, f"bcr/{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(bad)


def test_every_subpackage_has_a_place_in_the_order():
    packages = {p.name for p in (ROOT / "bcr").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


def test_the_kernels_never_import_bcr():
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for path in sorted((ROOT / "bcr_kernels").rglob("*.py"))
           for line, module in _imported_modules(path) if _bcr_subpackage(module) is not None]
    assert not bad, "\n".join(bad)
