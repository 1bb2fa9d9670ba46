"""The package's shape, read from its source (no import runs): imports point one way (core <- editing
<- serve) and form no cycle, no module imports another's private names, and files and functions
stay small enough to read at once."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "funcmem"
APPLICATION = ("funcmem.editing", "funcmem.serve")  # everything else is the core
MAX_CORE_LINES, MAX_FUNCTION_LINES = 400, 60


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def is_core(name: str) -> bool:
    return not any(name == a or name.startswith(a + ".") for a in APPLICATION)


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported funcmem module, names taken from it, line) for every import statement, at any depth.

    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module; importing
    ``a.b.c`` also imports the package ``a.b`` on the way, unless the importer lies inside it (then
    the package is already being imported) or it is the root (every import runs it first).
    """
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            attrs = [a.name for a in node.names if f"{base}.{a.name}" not in MODULES]
            targets = [(s, []) for s in subs] + ([(base, attrs)] if attrs else [])
        else:
            continue
        for target, names in targets:
            if target == ROOT or target.startswith(ROOT + "."):
                parts = target.split(".")
                parents = [".".join(parts[:i]) for i in range(2, len(parts))]
                out += [(p, [], node.lineno) for p in parents if p in MODULES and not name.startswith(p + ".")]
                out.append((target, names, node.lineno))
    return out


GRAPH = {name: {t for t, _, _ in imports(name) if t in MODULES and t != name} for name in MODULES}


def test_the_import_graph_has_no_cycle():
    state, path, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_imports_no_application_module():
    bad = [f"{name}:{line} imports {target}" for name in MODULES if is_core(name)
           for target, _, line in imports(name) if not is_core(target)]
    assert not bad, bad


def test_the_editing_application_does_not_import_the_server():
    bad = [f"{name}:{line} imports {target}" for name in MODULES if name.startswith("funcmem.editing")
           for target, _, line in imports(name) if target.startswith("funcmem.serve")]
    assert not bad, bad


def test_no_module_imports_another_modules_private_names():
    bad = [f"{name}:{line} takes {n} from {target}" for name in MODULES
           for target, names, line in imports(name) for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


@pytest.mark.parametrize("name", [n for n in MODULES if is_core(n)])
def test_core_files_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_CORE_LINES, f"{MODULES[name]} has {lines} lines (core limit {MAX_CORE_LINES})"


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({path.name}:{node.lineno}): {length} lines")
    assert not long, long


def test_the_checks_see_the_package():
    """The graph is read right: known edges are there (a broken reader would pass every test above)."""
    assert "funcmem.layers.base" in GRAPH["funcmem.targets"]
    assert "funcmem.editing.benchmark" in GRAPH["funcmem.editing.continual.config"]  # parent package
    assert "funcmem.hywu" in GRAPH["funcmem"]  # from . import hywu
    assert "funcmem.editing.rundir" in GRAPH["funcmem.serve.engine"]
    assert len(MODULES) > 50
