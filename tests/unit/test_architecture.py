"""The package's shape, read from its imports (ast; no root, no kernel):
no import circles, no module importing another's private names, and the
rooms' one-way doors (docs/architecture.md):

    errors, runtime  →  netns/  →  kernel/ (+ events)  →  probes/  →  report/  →  trace, sequence, selection,
                                                                                   plugin, cli (on top)

A module may import from its own room and the rooms before it, never after.
Imports under `if TYPE_CHECKING:` and inside functions count: a type-only
dependency backwards is still a door used backwards."""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, NamedTuple, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "pytest_nettrace"
PREFIX = "pytest_nettrace"

# room -> rank: a module imports only from rooms of a rank <= its own
ROOMS = {"errors": 0, "runtime": 0, "netns": 1, "kernel": 2, "events": 2, "probes": 3, "report": 4}
TOP = 5  # trace, sequence, selection, plugin, cli, the package itself


class Import(NamedTuple):
    source: str     # importing module
    target: str     # imported module
    name: str       # a name taken from it ("" for the module itself)
    line: int


def module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(package: pathlib.Path) -> Tuple[Set[str], List[Import]]:
    """Every module of `package` and every import between them."""
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    found: List[Import] = []
    for mod, path in files.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != package.name:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in files:   # `from . import sequence`: the module itself
                        found.append(Import(mod, sub, "", node.lineno))
                    else:
                        found.append(Import(mod, target, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package.name:
                        found.append(Import(mod, alias.name, "", node.lineno))
    return set(files), found


def rank(module: str) -> int:
    parts = module.split(".")
    return ROOMS.get(parts[1], TOP) if len(parts) > 1 else TOP


def circles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def private_imports(found: List[Import]) -> List[str]:
    """`from other import _name`, or a `_module` of another package."""
    bad = []
    for imp in found:
        if imp.source == imp.target:
            continue
        if imp.name.startswith("_") and not imp.name.startswith("__"):
            bad.append(f"{imp.source}:{imp.line} imports {imp.target}.{imp.name}")
        leaf = imp.target.rpartition(".")[2]
        # a package's private module is for its own modules
        if leaf.startswith("_") and not leaf.startswith("__") \
                and imp.target.rpartition(".")[0] != imp.source.rpartition(".")[0]:
            bad.append(f"{imp.source}:{imp.line} imports the private module {imp.target}")
    return bad


def backward_doors(found: List[Import]) -> List[str]:
    return [f"{imp.source}:{imp.line} imports {imp.target}" + (f".{imp.name}" if imp.name else "")
            + f" (rank {rank(imp.source)} -> {rank(imp.target)})"
            for imp in found if imp.source != PREFIX and rank(imp.target) > rank(imp.source)]


def graph(found: List[Import]) -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {}
    for imp in found:
        # the package's __init__ imports lazily (module __getattr__) and is
        # imported by every submodule's first import: not a dependency
        if imp.source != imp.target and PREFIX not in (imp.source, imp.target):
            edges.setdefault(imp.source, set()).add(imp.target)
    return edges


# -- the package --------------------------------------------------------------

MODULES, IMPORTS = imports_of(PACKAGE)


def test_every_module_has_a_room():
    # a new top-level module lands on top unless ROOMS says otherwise: say so here
    top = sorted(m for m in MODULES if rank(m) == TOP)
    assert top == ["pytest_nettrace", "pytest_nettrace.__main__", "pytest_nettrace.cli",
                   "pytest_nettrace.kind_methods", "pytest_nettrace.plugin", "pytest_nettrace.selection",
                   "pytest_nettrace.sequence", "pytest_nettrace.trace"], top


def test_no_import_circles():
    assert circles(graph(IMPORTS)) == []


def test_no_private_name_is_imported_across_modules():
    assert private_imports(IMPORTS) == []


def test_doors_open_one_way():
    assert backward_doors(IMPORTS) == []


# -- the checks themselves, on a made-up package --------------------------------

@pytest.fixture
def fake(tmp_path):
    root = tmp_path / PREFIX

    def write(files: Dict[str, str]) -> Tuple[Set[str], List[Import]]:
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for sub in {p.parent for p in root.rglob("*.py")}:
            (sub / "__init__.py").touch()
        return imports_of(root)
    return write


def test_a_circle_is_found(fake):
    _, found = fake({"trace.py": "from .report import timeline\n",
                     "report/timeline.py": "from typing import TYPE_CHECKING\n"
                                           "if TYPE_CHECKING:\n    from ..trace import Trace\n"})
    assert circles(graph(found)) == [["pytest_nettrace.report.timeline", "pytest_nettrace.trace"]]


def test_a_private_import_is_found(fake):
    _, found = fake({"cli.py": "from .report.timeline import _BACKGROUND, seed_line\n",
                     "report/timeline.py": "_BACKGROUND = ()\ndef seed_line(): pass\n",
                     "probes/rst.py": "from . import _nft\n",   # its own package's private module: fine
                     "probes/_nft.py": "",
                     "report/gates.py": "from ..probes import _nft\n"})
    assert private_imports(found) == [
        "pytest_nettrace.cli:1 imports pytest_nettrace.report.timeline._BACKGROUND",
        "pytest_nettrace.report.gates:1 imports the private module pytest_nettrace.probes._nft"]


def test_a_door_used_backwards_is_found(fake):
    _, found = fake({"kernel/engine.py": "def probes():\n    from ..probes import registry\n",
                     "probes/registry.py": "from ..kernel import engine\n",
                     "probes/packet.py": "import pytest_nettrace.report.captures\n",
                     "report/captures.py": ""})
    assert backward_doors(found) == [
        "pytest_nettrace.kernel.engine:2 imports pytest_nettrace.probes.registry (rank 2 -> 3)",
        "pytest_nettrace.probes.packet:1 imports pytest_nettrace.report.captures (rank 3 -> 4)"]


# -- the Trace exposes every kind's methods -----------------------------------

def test_trace_exposes_every_public_method_of_every_kind():
    # a kind's method missing from the Trace would be unreachable (and untyped)
    from pytest_nettrace.probes.context import KindApi
    from pytest_nettrace.probes.registry import API_CLASSES
    from pytest_nettrace.trace import Trace
    missing = []
    for api in API_CLASSES:
        for name, member in vars(api).items():
            if name.startswith("_") or name in vars(KindApi) or not (callable(member) or isinstance(member, property)):
                continue
            exposed = vars(Trace).get(name) or getattr(Trace, name, None)
            if getattr(exposed, "api", None) is not api or getattr(exposed, "name", None) != name:
                missing.append(f"{api.__name__}.{name}")
    assert missing == [], f"not exposed by Trace (run python -m pytest_nettrace.probes): {missing}"


def test_the_generated_kind_methods_are_current():
    # a probe added to the registry (or a method to a query class) reaches the
    # Trace by regenerating pytest_nettrace/kind_methods.py
    from pytest_nettrace.probes import registry
    with open(registry.KIND_METHODS_FILE) as f:
        assert f.read() == registry.kind_methods_source(), "stale: run python -m pytest_nettrace.probes"


def test_a_new_method_makes_the_generated_methods_stale(monkeypatch):
    from pytest_nettrace.probes import registry
    from pytest_nettrace.probes.rst import RstApi

    def assert_rst_twice(self):  # noqa: ANN001, ANN202 - a stand-in
        """Two resets."""
    monkeypatch.setattr(RstApi, "assert_rst_twice", assert_rst_twice, raising=False)
    assert "    assert_rst_twice = Delegate(RstApi.assert_rst_twice)" in registry.kind_methods_source()
