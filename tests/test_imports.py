"""The import graph of the `hf_kd` package has no cycles ("no import cycles", the project's rules).

The graph is read from the source with `ast`, without importing anything: every `import hf_kd.x` / `from hf_kd.x import
y` / `from .x import y` / `from . import x`, at module level and inside functions (lazy imports count: a lazy import
only hides a cycle until the function runs). An import of a package is an edge to its `__init__`; `from package import
name` is an edge to `package.name` when that is a module, else to the package's `__init__`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hf_kd"
ROOT = Path(__file__).resolve().parents[1]


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """`{dotted module name: file}` for every module of `package` under `root` (a package is its `__init__`)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the graph that `name` loads: itself, or the closest enclosing package for an attribute."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the graph that `module` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from .x import y` in a.b.c (module) is relative to a.b; in a.b/__init__ (package), to a.b.
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import name` loads package.name when that is a module, else the package itself.
            targets = [f"{source}.{alias.name}" for alias in node.names] + [source]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root, package)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as `[a, b, ..., a]`, or `None` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_finds_lazy_and_relative_cycles(tmp_path):
    # The checker itself: a cycle closed by a lazy relative import inside a function, through a package __init__.
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import x\n")
    graph = import_graph(tmp_path)
    assert graph["hf_kd.a"] == {"hf_kd.sub"} and graph["hf_kd.sub"] == {"hf_kd.sub.b"}
    assert find_cycle(graph) == ["hf_kd.a", "hf_kd.sub", "hf_kd.sub.b", "hf_kd.a"]
    (pkg / "sub" / "b.py").write_text("import hf_kd.c\n")  # absolute, to a module that is not there: no edge
    assert find_cycle(import_graph(tmp_path)) is None


def test_hf_kd_has_no_import_cycles():
    graph = import_graph()
    assert "hf_kd.trainer.base_trainer" in graph and "hf_kd.hub" in graph["hf_kd.trainer.base_trainer"]
    cycle = find_cycle(graph)
    if cycle is not None:
        pytest.fail("import cycle in hf_kd: " + " -> ".join(cycle))


def test_leaf_modules_import_no_hf_kd_module():
    # Modules that both sides of former cycles import: they must stay leaves.
    graph = import_graph()
    for leaf in ("hf_kd.modeling.exit_policies", "hf_kd.metric_keys"):
        assert leaf in graph, f"{leaf} is missing"
        assert graph[leaf] == set(), f"{leaf} must import no hf_kd module, imports {sorted(graph[leaf])}"
