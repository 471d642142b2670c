"""The package's shape: no import cycle, a sanitize core free of heavy and research modules, method names only in
the method registry, and the entry points (``onnxclp methods --json``, ``--version``, ``python -m onnxclp``).

The import checks read the source with :mod:`ast` instead of importing it: an import that runs at module load
(top level, including inside a top-level ``try`` or ``if``) is an edge; an import inside a function or under
``if TYPE_CHECKING:`` is lazy and allowed. A module importing its own parent packages is not an edge (Python
always initialises the parent first, and re-exporting from ``__init__`` is the usual pattern).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import onnxclp

ROOT = Path(onnxclp.__file__).resolve().parent
CORE = (
    "io",
    "graph",
    "layers",
    "weights",
    "scores",
    "scoring",
    "select",
    "edit",
    "passes",
    "methods",
    "pipeline",
    "api",
    "report",
    "detect",
    "scanning",
    "validate",
)
FORBIDDEN_IN_CORE = ("onnxclp.eval", "onnxclp.study", "onnxclp.cli", "typer", "torch", "onnxruntime")


def _module_name(path: Path) -> str:
    parts = ["onnxclp", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _sources()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(stmts: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is loaded (not in functions, classes' methods or
    ``if TYPE_CHECKING:`` blocks)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for s in stmts:
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            out.append(s)
        elif isinstance(s, ast.If):
            if not _is_type_checking(s.test):
                out += _top_level_imports(s.body)
            out += _top_level_imports(s.orelse)
        elif isinstance(s, ast.Try):
            for block in (s.body, s.orelse, s.finalbody, *(h.body for h in s.handlers)):
                out += _top_level_imports(block)
        elif isinstance(s, (ast.With, ast.ClassDef)):
            out += _top_level_imports(s.body)
    return out


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[tuple[str, int]]:
    """Absolute names imported by ``node``: the rule of tests/test_imports.py (a submodule named in ``from pkg
    import sub`` counts as ``pkg.sub``)."""
    from test_imports import _targets

    return _targets(module, is_package, node)


def _graph() -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported name, line)] for every top-level import of every onnxclp module."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        graph[name] = [t for node in _top_level_imports(tree.body) for t in _resolve(name, is_package, node)]
    return graph


GRAPH = _graph()


def _internal_edges(module: str) -> set[str]:
    """onnxclp modules ``module`` imports at load time, without its own ancestors."""
    out = set()
    for target, _ in GRAPH[module]:
        while target and target not in MODULES:  # ``import onnxclp.x.y`` names a module; an attribute import too
            target = target.rpartition(".")[0]
        if target and not module.startswith(target + ".") and target != module:
            out.add(target)
    return out


def _find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(_internal_edges(m)):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(MODULES):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_import_graph_sees_the_package():
    # A guard for the checks below: the walk finds the modules and their imports.
    assert {"onnxclp.api", "onnxclp.pipeline", "onnxclp.passes.score", "onnxclp.cli.core"} <= set(MODULES)
    assert "onnxclp.pipeline" in _internal_edges("onnxclp.passes.score")
    assert "onnxclp.methods" in _internal_edges("onnxclp.api")
    # the pipeline imports no pass (the pass list is onnxclp.api.passes())
    assert not any(t.startswith("onnxclp.passes") for t in _internal_edges("onnxclp.pipeline"))


def test_no_import_cycle():
    cycle = _find_cycle()
    assert cycle is None, "import cycle (top-level imports): " + " -> ".join(cycle or [])


def _is_core(module: str) -> bool:
    return any(module == f"onnxclp.{c}" or module.startswith(f"onnxclp.{c}.") for c in CORE)


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_CORE)


def test_sanitize_core_does_not_import_eval_study_cli_typer_torch_or_onnxruntime():
    """Directly or through other onnxclp modules, at load time."""
    core = sorted(m for m in MODULES if _is_core(m))
    assert len(core) > 20, core
    problems = []
    for start in core:
        seen, todo = {start: [start]}, [start]
        while todo:
            m = todo.pop()
            for target, line in GRAPH[m]:
                if _forbidden(target):
                    where = f"{MODULES[m].relative_to(ROOT.parent).as_posix()}:{line}"
                    problems.append(f"{' -> '.join(seen[m])} imports {target} ({where})")
            for n in _internal_edges(m):
                if n not in seen:
                    seen[n] = [*seen[m], n]
                    todo.append(n)
    assert not problems, "\n".join(sorted(set(problems)))


def test_method_names_live_only_in_the_method_registry():
    """The literal ``"lpp"`` appears in no module of onnxclp outside onnxclp/methods/: everything else asks the
    registry (so a new method is one module, not a search through the code)."""
    hits = []
    for name, path in MODULES.items():
        rel = path.relative_to(ROOT.parent).as_posix()
        if name == "onnxclp.methods" or name.startswith("onnxclp.methods."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value == "lpp":
                hits.append(f"{rel}:{node.lineno}")
    assert not hits, hits


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)


def test_methods_json_lists_every_registered_method():
    from onnxclp import methods

    r = _run(sys.executable, "-m", "onnxclp", "methods", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert isinstance(listed, list) and [m["name"] for m in listed] == methods.names()
    for m in listed:
        assert {"name", "needs", "description", "defaults"} <= set(m), m
        assert m["needs"] in methods.NEEDS and m["description"].strip()
        assert isinstance(m["defaults"], dict) and "score" in m["defaults"]
    assert {"clp", "lpp"} <= {m["name"] for m in listed}


def test_version_and_python_m():
    r = _run(sys.executable, "-m", "onnxclp", "--version")
    assert r.returncode == 0 and r.stdout.strip() == onnxclp.__version__, r.stdout + r.stderr
    r = _run(sys.executable, "-m", "onnxclp", "--help")
    assert r.returncode == 0, r.stderr
    for command in ("sanitize", "scan", "methods"):
        assert command in r.stdout


def test_console_script():
    exe = shutil.which("onnxclp", path=str(Path(sys.executable).parent)) or shutil.which("onnxclp")
    if exe is None:
        pytest.skip("the onnxclp console script is not installed")
    r = _run(exe, "--version")
    assert r.returncode == 0 and r.stdout.strip() == onnxclp.__version__, r.stdout + r.stderr
    r = _run(exe, "methods", "--json")
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr
