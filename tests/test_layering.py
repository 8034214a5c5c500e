"""Layering: core is pure torch (its native kernels live in native/, a leaf); only models/ imports transformers/peft;
only fl/ imports flwr."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fcmoe"


def fcmoe_modules(path: Path) -> set[str]:
    """The ``fcmoe.*`` modules a file imports from."""
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name for name in found if name.startswith("fcmoe.")}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_import_boundaries(path: Path) -> None:
    rel = path.relative_to(PACKAGE)
    roots = imported_roots(path)
    if rel.parts[0] == "core":
        assert roots <= {"__future__", "collections", "typing", "torch", "fcmoe", "math", "dataclasses"}, roots
        outside = {m for m in fcmoe_modules(path) if not m.startswith("fcmoe.core")}
        assert outside <= {"fcmoe.native"}, f"{rel} imports {outside}; core may only call its native kernels"
    if rel.parts[0] == "native":  # compiled kernels: a leaf the core may call, which calls nothing of fcmoe back
        allowed = {"fcmoe.cache", "fcmoe.native.consensus_kernel", "fcmoe.native.consensus_read_source"}
        assert fcmoe_modules(path) <= allowed, fcmoe_modules(path)
    if rel.parts[0] != "models":
        assert not roots & {"transformers", "peft"}, f"{rel} imports transformers/peft; only fcmoe/models may"
    if rel.parts[0] != "fl":
        assert "flwr" not in roots, f"{rel} imports flwr; only fcmoe/fl may"
    assert len(path.read_text().splitlines()) <= 400, f"{rel} is over 400 lines"


def test_core_sources_found() -> None:
    assert any(p.parts[-2] == "core" for p in FILES)
