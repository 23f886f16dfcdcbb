"""The rooms of ../shared/DESIGN.md: who may import whom, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"training_plan", "secure_agg", "silo_client", "aggregator", "fedsilo"}

# What each room may import of ours. secure_agg's Flower adapter (one module) reads the wire
# names of the plan contract; its core imports nothing of ours.
ALLOWED = {
    "training_plan": {"training_plan"},
    "secure_agg": {"secure_agg"},
    "silo_client": {"silo_client", "training_plan", "secure_agg"},
    "aggregator": {"aggregator", "training_plan", "secure_agg"},
    "fedsilo": OURS,
}
EXCEPTIONS = {"secure_agg/flower.py": {"training_plan"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports_only_what_it_may(room: str) -> None:
    bad = []
    for path in sorted((ROOT / room).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[room] | EXCEPTIONS.get(rel, set())
        extra = _imports(path) - allowed
        if extra:
            bad.append(f"{rel} imports {sorted(extra)}")
    assert not bad, "; ".join(bad)


def test_secure_agg_core_has_no_flower_import() -> None:
    for path in sorted((ROOT / "secure_agg").glob("*.py")):
        if path.name == "flower.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "flwr" for n in names), f"{path.name} imports flwr"
