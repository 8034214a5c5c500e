"""Layering: dependencies point one way, and the third-party boundaries hold (only models/ imports
transformers/peft, only fl/ imports flwr, core is plain tensor math).

Every ``import`` statement counts, function-local ones included: a module may import its own package and any
module of a lower layer, never one of a higher layer, and none of the pairs in FORBIDDEN. An import under
``if TYPE_CHECKING:`` is a type hint, not a dependency (it never runs): it may name a higher layer (data's loaders
are typed with the config sections they read), never a FORBIDDEN pair.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fcmoe"

# lowest first; a module belongs to the longest prefix listed
LAYERS: dict[str, int] = {
    "fcmoe": 0, "fcmoe.core": 0, "fcmoe.registry": 0, "fcmoe.cache": 0, "fcmoe.config_sections": 0,
    "fcmoe.process_memory": 0, "fcmoe.plots": 0, "fcmoe.files": 0,  # leaves: they import no other fcmoe module
    "fcmoe.errors": 0,  # a leaf too: how an exception is quoted in a one-line message
    "fcmoe.metrics_row": 0,  # a leaf: the keys of a metrics.jsonl row
    "fcmoe.data": 1,
    "fcmoe.models": 2,
    "fcmoe.training": 3,  # local training reads its own [train] section: below the algorithms, which drive it
    "fcmoe.algorithms": 4,
    "fcmoe.config": 5,
    "fcmoe.experiment": 6,
    "fcmoe.spill": 6,  # a round's updates beyond the server's memory budget, on disk
    "fcmoe.rounds": 7,
    "fcmoe.runs": 8, "fcmoe.checkpoint": 8,  # run-folder I/O and checkpoints, below both engines
    "fcmoe.sim": 9, "fcmoe.fl": 9,  # the engines
    "fcmoe.tracking": 9,  # metrics.jsonl rows mirrored to TensorBoard
    "fcmoe.plan": 9,  # fcmoe plan: counts and memory from shapes, before loading
    "fcmoe.runner": 10, "fcmoe.sweep": 11, "fcmoe.study": 12, "fcmoe.report": 12, "fcmoe.cli": 13,
    "fcmoe.cli_errors": 12, "fcmoe.listing": 12,
}
LEAVES = {name for name, rank in LAYERS.items() if rank == 0 and name != "fcmoe.core"}
FORBIDDEN = {("fcmoe.fl", "fcmoe.sim"), ("fcmoe.sim", "fcmoe.fl"), ("fcmoe.sim", "fcmoe.report")}
CORE_ROOTS = {"__future__", "collections", "typing", "torch", "fcmoe", "math", "dataclasses"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def owner(module: str) -> str:
    """The LAYERS entry a module belongs to (its longest listed prefix)."""
    matches = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return max(matches, key=len)


def imports(source: str) -> tuple[set[str], set[str], set[str]]:
    """(the fcmoe modules a file imports, those of them under ``if TYPE_CHECKING:``, the top-level packages it
    imports), every statement counted."""
    tree = ast.parse(source)
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            typing_only |= {n.module for child in node.body for n in ast.walk(child)
                            if isinstance(n, ast.ImportFrom) and n.module}
    modules, roots = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        roots |= {name.split(".")[0] for name in names}
        modules |= {name for name in names if name.startswith("fcmoe.")}
    return modules, typing_only, roots


FILES = sorted(PACKAGE.rglob("*.py"))


def layering_problems(path: Path, source: str | None = None) -> list[str]:
    """Every import of ``path`` (or of ``source`` as if it were that file) that goes up a layer, crosses a
    forbidden pair or leaves its boundary."""
    name = module_name(path)
    here = owner(name)
    modules, typing_only, roots = imports(path.read_text() if source is None else source)
    problems = []
    for target in modules:
        there = owner(target)
        if there == here or (here in LEAVES and target == name):
            continue
        pair = next((p for p in FORBIDDEN if here.startswith(p[0]) and there.startswith(p[1])), None)
        if pair:
            problems.append(f"{name} imports {target}: {pair[0]} must not import {pair[1]}")
        elif LAYERS[there] >= LAYERS[here] and target not in typing_only:
            problems.append(f"{name} (layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    if here == "fcmoe.core" and not roots <= CORE_ROOTS:
        problems.append(f"{name} imports {sorted(roots - CORE_ROOTS)}; core is plain tensor math")
    if not name.startswith("fcmoe.models") and roots & {"transformers", "peft"}:
        problems.append(f"{name} imports transformers/peft; only fcmoe.models may")
    if not name.startswith("fcmoe.fl") and "flwr" in roots:
        problems.append(f"{name} imports flwr; only fcmoe.fl may")
    return problems


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_dependencies_point_one_way(path: Path) -> None:
    assert layering_problems(path) == []


def test_the_check_catches_an_import_from_fl_into_sim() -> None:
    """A deliberately added ``fl → sim`` import (function-local, as the ones this test was written against) fails."""
    path = PACKAGE / "fl" / "strategy.py"
    source = path.read_text() + "\n\ndef _leak() -> None:\n    from fcmoe.sim.engine import run_method  # noqa: F401\n"
    assert layering_problems(path, source) == ["fcmoe.fl.strategy imports fcmoe.sim.engine: fcmoe.fl must not import "
                                       "fcmoe.sim"]


def test_every_module_has_a_layer() -> None:
    assert all(owner(module_name(p)) for p in FILES)
    assert any(module_name(p).startswith("fcmoe.core.") for p in FILES)
