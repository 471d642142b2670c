"""No import cycle in onnxclp at any level, and the CLI on top.

The check reads the source with :mod:`ast` (nothing is imported) and draws one edge for every import statement
of every module of ``onnxclp``: at module level and inside functions and methods alike (a lazy import that closes
a cycle still ties the two modules together), except those under ``if TYPE_CHECKING:``.

How an import becomes an edge:

- ``import a.b.c`` and ``from a.b.c import name`` (``name`` not a submodule) are an edge to ``a.b.c``: the module
  named (its ``__init__`` when it is a package), whose namespace the name is read from;
- ``from a.b import c`` where ``a.b.c`` is a submodule is an edge to ``a.b.c`` only;
- relative imports are resolved first (``from .x import y`` in ``a.b.m`` is ``from a.b.x import y``);
- the parent packages Python initialises on the way (``a`` and ``a.b`` for ``import a.b.c``) are not edges:
  every submodule would otherwise be in a cycle with any ``__init__`` that re-exports its submodules. A module
  that names a package's ``__init__`` (``from onnxclp.methods import get`` inside ``onnxclp/methods/clp.py``,
  while ``onnxclp/methods/__init__.py`` imports ``clp``) does draw the edge, and that is a cycle.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import onnxclp

ROOT = Path(onnxclp.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ["onnxclp", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, lazy ones included, except in ``if TYPE_CHECKING:`` bodies."""
    out: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append(child)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for s in child.orelse:
                out += [s] if isinstance(s, (ast.Import, ast.ImportFrom)) else _imports(s)
        else:
            out += _imports(child)
    return out


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[tuple[str, int]]:
    """(absolute module, line) for each name ``node`` imports, by the rule in the module docstring."""
    if isinstance(node, ast.Import):
        return [(a.name, node.lineno) for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    return [(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target, node.lineno) for a in node.names]


def _graph() -> dict[str, dict[str, int]]:
    """module -> {onnxclp module it imports: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: dict[str, int] = {}
        for node in _imports(tree):
            for target, line in _targets(name, path.name == "__init__.py", node):
                while target and target not in MODULES:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, line)
        graph[name] = edges
    return graph


GRAPH = _graph()


def _cycles() -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for m in sorted(MODULES):
        if m not in index:
            connect(m)
    return [_a_cycle(set(c)) for c in components]


def _a_cycle(component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, by breadth-first search."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(GRAPH[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in {component}")


def _show(cycle: list[str]) -> str:
    hops = [
        f"{a} ({MODULES[a].relative_to(ROOT.parent).as_posix()}:{GRAPH[a][b]})" for a, b in itertools.pairwise(cycle)
    ]
    return " -> ".join([*hops, cycle[-1]])


def test_the_walk_sees_lazy_imports_and_skips_type_checking():
    assert {"onnxclp.api", "onnxclp.pipeline", "onnxclp.cli.core", "onnxclp.eval.api"} <= set(MODULES)
    # onnxclp/__init__.py imports evaluate/compare from onnxclp.eval.api inside __getattr__: a lazy import
    assert "onnxclp.eval.api" in GRAPH["onnxclp"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert [a.name for node in _imports(tree) for a in node.names] == ["TYPE_CHECKING", "y"]


def test_no_import_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(_show(c) for c in cycles)


def test_only_the_cli_imports_the_cli():
    bad = [
        f"{m} imports {t} ({MODULES[m].relative_to(ROOT.parent).as_posix()}:{line})"
        for m, edges in GRAPH.items()
        if not (m == "onnxclp.cli" or m.startswith("onnxclp.cli.") or m == "onnxclp.__main__")
        for t, line in edges.items()
        if t == "onnxclp.cli" or t.startswith("onnxclp.cli.")
    ]
    assert not bad, "\n".join(bad)
