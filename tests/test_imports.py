"""The package's import graph has no cycles, function-level imports included, and every
module imports on its own.

Edges come from every ``import`` statement of a module, at top level or inside a function
(``from .x import y``, ``from vlmsae_utils.x import y``, ``import vlmsae_utils.x``,
``importlib.import_module("vlmsae_utils.x")``), relative imports resolved against the module's
package. Nothing is left out: imports under ``if TYPE_CHECKING:`` and ``if __name__ == "__main__":``
are edges too (the command line's modules, ``run`` and ``__main__``, import :mod:`.cli`, which
imports :mod:`.runner`, never them). A submodule's implicit import of its parent package is not
an edge.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import vlmsae_utils

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pytest depends on tomli there)
    tomllib = pytest.importorskip("tomli")

PACKAGE = "vlmsae_utils"
ROOT = Path(vlmsae_utils.__file__).resolve().parent


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package's ``__init__`` under the package's name)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _nodes(tree: ast.AST):
    """Every node of ``tree``."""
    return ast.walk(tree)


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules: dict[str, Path]) -> dict[str, int]:
    """Package modules imported by ``module`` → line of the first such import."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        target = _target(name, modules) if name else None
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in _nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                name = f"{base}.{alias.name}"
                add(name if name in modules else base, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            name = node.args[0].value
            if name.startswith("."):
                anchor = len(name) - len(name.lstrip("."))
                parts = package.split(".")
                name = ".".join([*parts[: len(parts) - (anchor - 1)], name.lstrip(".")])
            add(name, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """The package's module import graph: module → {imported module: line}."""
    modules = module_files()
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_builder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
        "if __name__ == '__main__':\n    import vlmsae_utils.a\n"
    )
    (pkg / "sub" / "__init__.py").write_text("from .. import b\n")
    (pkg / "sub" / "c.py").write_text(
        "from . import d\nfrom ..sub import e\nimport vlmsae_utils.a.x\n"
        "import importlib\nimportlib.import_module('vlmsae_utils.b')\n"
    )
    (pkg / "sub" / "d.py").write_text("")
    (pkg / "sub" / "e.py").write_text("")
    global ROOT
    saved, ROOT = ROOT, pkg
    try:
        graph = import_graph()
    finally:
        ROOT = saved
    assert graph[f"{PACKAGE}.a"] == {f"{PACKAGE}.b": 2}
    assert graph[f"{PACKAGE}.b"] == {f"{PACKAGE}.a": 3}  # the TYPE_CHECKING (line 3) and __main__ blocks count
    assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]
    del graph[f"{PACKAGE}.b"][f"{PACKAGE}.a"]
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.b": 1}
    assert set(graph[f"{PACKAGE}.sub.c"]) == {f"{PACKAGE}.sub.d", f"{PACKAGE}.sub.e", f"{PACKAGE}.a", f"{PACKAGE}.b"}
    assert find_cycle(graph) is None
    assert find_cycle({"x": {"y": 1}, "y": {"z": 1}, "z": {"x": 1}}) == ["x", "y", "z", "x"]


def test_package_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 20 and f"{PACKAGE}.steering" in graph
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} imports {b} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle:\n  " + "\n  ".join(steps))


def test_every_module_imports_on_its_own():
    """Each module imports with no other package module loaded before it (one interpreter;
    the package's modules are dropped from ``sys.modules`` between imports, third-party ones kept)."""
    names = [m for m in module_files() if not m.endswith("__main__")]
    script = (
        "import importlib, sys, traceback\n"
        f"failed = []\nfor name in {names!r}:\n"
        f"    for loaded in [m for m in sys.modules if m == {PACKAGE!r} or m.startswith({PACKAGE + '.'!r})]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except BaseException:\n        failed.append(name + ':\\n' + traceback.format_exc())\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_subpackage_is_installed():
    """``[tool.setuptools] packages`` lists the package and each subpackage (a wheel would lack the others)."""
    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    packages = {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert set(pyproject["tool"]["setuptools"]["packages"]) == packages


def _imported_names(path: Path, package: str | None) -> list[tuple[str, str]]:
    """(module, name) of every ``from <package module> import name`` in a file (relative ones resolved)."""
    pairs = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or (node.module is None and not node.level):
            continue
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join([*parts, node.module] if node.module else parts)
        else:
            module = node.module
        if module.split(".")[0] == PACKAGE:
            pairs += [(module, alias.name) for alias in node.names if not alias.name.startswith("_")]
    return pairs


def test_every_module_declares_its_public_api_and_others_import_only_from_it():
    """``__all__`` lists what a module offers: every entry exists, and every public name another
    module, test or benchmark imports from it is listed (a submodule is fine too)."""
    import importlib

    modules = module_files()
    files = [(path, name if path.name == "__init__.py" else name.rpartition(".")[0]) for name, path in modules.items()]
    files += [
        (p, None)
        for p in sorted((ROOT.parent / "tests").glob("*.py")) + sorted((ROOT.parent / "benchmarks").glob("*.py"))
    ]
    unlisted = []
    for name in modules:
        if name == PACKAGE or name.endswith("__main__"):
            continue
        listed = getattr(importlib.import_module(name), "__all__", None)
        assert listed is not None, f"{name} has no __all__"
        assert all(hasattr(importlib.import_module(name), entry) for entry in listed), name
    for path, package in files:
        for module, imported in _imported_names(path, package):
            if module == PACKAGE or f"{module}.{imported}" in modules:
                continue
            if imported not in importlib.import_module(module).__all__:
                unlisted.append(f"{path.name} imports {imported} from {module}")
    assert not unlisted, "\n".join(unlisted)
