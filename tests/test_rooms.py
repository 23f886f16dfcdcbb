"""The rooms of ../shared/DESIGN.md: who may import whom, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = "fedsilo_base"
OURS = {GROUND, "training_plan", "secure_agg", "silo_client", "aggregator", "fedsilo"}

# What each room may import of ours. Every room stands on the ground floor, which imports none
# of ours. secure_agg's Flower adapter (one module) reads the wire names of the plan contract;
# its core imports nothing of ours but the ground floor.
ALLOWED = {
    GROUND: {GROUND},
    "training_plan": {GROUND, "training_plan"},
    "secure_agg": {GROUND, "secure_agg"},
    "silo_client": {GROUND, "silo_client", "training_plan", "secure_agg"},
    "aggregator": {GROUND, "aggregator", "training_plan", "secure_agg"},
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


def _modules_imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_ground_floor_holds_no_flower_plan_or_protocol() -> None:
    """The ground floor is helpers only: no Flower, no plan contract, no protocol."""
    for path in sorted((ROOT / GROUND).rglob("*.py")):
        imported = _modules_imported(path)
        flower = {m for m in imported if m.split(".")[0] == "flwr"}
        assert not flower, f"{path.name} imports {sorted(flower)}"


# The helpers that live once, on the ground floor: no room defines its own again.
GROUND_ONLY = {
    "write_atomic", "_write_atomic", "_atomic_write", "_atomic", "_write_private",
    "fingerprint", "fingerprint_of", "ssh_key_fingerprint", "certificate_fingerprint",
    "probe_tls", "stop_process_tree", "superexec_helpers", "_children_by_parent_pid",
    "_home_option", "run_cli",
}  # fmt: skip
# pacs.py keeps a one-line wrapper that names its staging folder; it calls the ground floor.
# training_plan.signing.fingerprint is another thing under the same name: the short id of a
# researcher's key (16 hex digits), not the grouped fingerprint read out on the phone.
WRAPPERS = {
    ("silo_client/data/pacs.py", "_write_atomic"),
    ("training_plan/signing.py", "fingerprint"),
}


def test_shared_helpers_are_defined_only_on_the_ground_floor() -> None:
    again = []
    for room in sorted(ALLOWED):
        if room == GROUND:
            continue
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in tree.body:  # module-level functions only: methods may share a name
                if (
                    isinstance(node, ast.FunctionDef)
                    and node.name in GROUND_ONLY
                    and (rel, node.name) not in WRAPPERS
                ):
                    again.append(f"{rel}:{node.lineno} defines {node.name}")
    assert not again, "; ".join(again)


def test_every_room_is_a_distributed_package() -> None:
    """A room missing from pyproject's packages.find is missing from the installed wheel."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    assert all(f"{room}*" in include for room in ALLOWED), include


def _module_graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours each one imports, at any depth of the file (an
    import inside a function still closes a cycle at run time), except ``TYPE_CHECKING`` blocks."""
    modules: dict[str, Path] = {}
    for room in OURS:
        for path in (ROOT / room).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def walk(node: ast.AST):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (n for c in child.orelse for n in walk(c))
                continue
            yield child
            yield from walk(child)

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {m for a in node.names if (m := known(a.name))}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if (m := known(target if target in modules else base)) is not None:
                        deps.add(m)
        deps.discard(name)
        graph[name] = deps
    return graph


def test_no_import_cycles_between_our_modules() -> None:
    graph = _module_graph()
    cycles = []
    for start in sorted(graph):
        # depth-first search for a path back to start through modules after it (each cycle once)
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt > start and nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "import cycles: " + "; ".join(cycles)
# The modules that replaced silo_client/data/dicom_dataset.py, and catalogued.py, which once
# sat in an import cycle with it (hidden by an import inside a function).
DATASET_MODULES = (
    "silo_client.data.preprocessing",
    "silo_client.data.folder_scan",
    "silo_client.data.labels_csv",
    "silo_client.data.local_dataset",
    "silo_client.data.catalogued",
    "silo_client.data.dataset_builder",
)


def test_demo_data_generators_are_not_in_the_silo() -> None:
    """The synthetic hospitals are demo and test data: they live in fedsilo, not in the
    hospital's package (and silo_client imports nothing of fedsilo: see the rooms above)."""
    shipped = sorted(
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "silo_client").rglob("*")
        if p.stem == "synthetic" and (p.suffix == ".py" or p.is_dir())
    )
    assert not shipped, shipped
    assert (ROOT / "fedsilo" / "synthetic" / "__init__.py").is_file()


@pytest.mark.parametrize("module", DATASET_MODULES)
def test_dataset_modules_import_ours_at_module_level_only(module: str) -> None:
    """An import of ours inside a function is how a cycle hides: these modules have none."""
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "." * node.level]
            inside += [f"{func.name} imports {n}" for n in names if n.split(".")[0] in OURS]
    assert not inside, f"{module}: {'; '.join(inside)}"


@pytest.mark.parametrize("module", DATASET_MODULES)
def test_dataset_module_imports_alone(module: str) -> None:
    """Each module imports first in a fresh interpreter: no cycle needs another one loaded."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
