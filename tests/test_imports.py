"""The import graph of the `hf_kd` package has no cycles ("no import cycles", the project's rules), and no test module
imports another test module (shared builders live in tests/testing_utils.py, shared fixtures in tests/conftest.py).

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


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str = PACKAGE) -> set[str]:
    """The modules of the graph (those of `package`) that `module` imports, anywhere in its file."""
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
            if target == package or target.startswith(package + "."):
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root, package)
    return {module: imports_of(module, path, modules, package) for module, path in modules.items()}


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


# The layers of docs/architecture.md: a module imports only modules of its own layer or below (and `modeling/` only
# itself, since its files are copied beside saved weights for trust_remote_code). A new module must be placed here,
# which keeps the document true.
LAYERS = {
    1: (  # leaves: pure functions and small tables, no service
        "options", "metric_keys", "version", "import_utils", "offline_models", "checkpoints", "metrics", "losses",
        "self_kd", "prediction_sets", "student",
    ),
    2: (  # services: teacher loading, data, calibration, reports, cards, method math that needs a teacher
        "teacher", "distributed", "peft_utils", "tinybert", "kd_layer_targets", "evaluation", "calibration", "plots",
        "early_exit", "confidence_search", "hub", "data", "lm_data", "cross_tokenizer", "evaluate_metrics", "lm_head",
    ),
    3: ("trainer",),  # the trainer/config pairs
    # entry points: the public API (hf_kd/__init__.py), the CLI, the recipes' shared code (classifiers, causal LMs)
    4: ("", "cli", "recipes", "lm_recipes"),
}


def layer_of(module: str) -> int | str:
    """The layer of `hf_kd.x.y` (by `x`), or `"modeling"` for `hf_kd.modeling.*`."""
    top = module.removeprefix(PACKAGE).lstrip(".").split(".")[0]
    if top == "modeling":
        return "modeling"
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise KeyError(f"{module} has no layer: place it in LAYERS (tests/test_imports.py) and docs/architecture.md")


def test_every_import_goes_to_the_same_layer_or_below():
    bad = []
    for module, imported in import_graph().items():
        mine = layer_of(module)
        for other in imported:
            theirs = layer_of(other)
            if mine == "modeling":
                ok = theirs == "modeling"
            else:
                ok = theirs == "modeling" and mine >= 2 or theirs != "modeling" and theirs <= mine
            if not ok:
                bad.append(f"{module} (layer {mine}) imports {other} (layer {theirs})")
    assert not bad, "imports against docs/architecture.md's layers:\n" + "\n".join(sorted(bad))


def cross_test_imports(root: Path = ROOT) -> dict[str, list[str]]:
    """`{test module: [the test modules it imports]}` for the `tests` package under `root` (sub-packages included)."""
    graph = import_graph(root, "tests")

    def is_test_module(name: str) -> bool:
        return name.rpartition(".")[2].startswith("test_")

    return {
        module: sorted(target for target in targets if is_test_module(target))
        for module, targets in graph.items()
        if is_test_module(module) and any(is_test_module(target) for target in targets)
    }


def test_test_module_check_finds_relative_absolute_and_lazy_imports(tmp_path):
    # The checker itself: relative, absolute and lazy imports of a test module, from the top level and a sub-package.
    (tmp_path / "tests" / "distributed").mkdir(parents=True)
    for name in ("__init__", "testing_utils", "conftest", "distributed/__init__", "test_ok"):
        (tmp_path / "tests" / f"{name}.py").write_text("")
    (tmp_path / "tests" / "test_ok.py").write_text("from .testing_utils import tiny_bert\nfrom . import testing_utils\n")
    (tmp_path / "tests" / "test_a.py").write_text("from .test_b import make_trainer\n")
    (tmp_path / "tests" / "test_b.py").write_text("def f():\n    from tests import test_ok\n")
    (tmp_path / "tests" / "distributed" / "test_c.py").write_text("from ..test_a import x\nimport tests.testing_utils\n")
    assert cross_test_imports(tmp_path) == {
        "tests.test_a": ["tests.test_b"],
        "tests.test_b": ["tests.test_ok"],
        "tests.distributed.test_c": ["tests.test_a"],
    }


def test_no_test_module_imports_another():
    offenders = cross_test_imports()
    assert "tests.testing_utils" in import_graph(ROOT, "tests")["tests.test_distill_trainer"]  # the checker sees tests
    assert not offenders, (
        "test modules import other test modules (move the shared builders to tests/testing_utils.py, fixtures to "
        f"tests/conftest.py): {offenders}"
    )
