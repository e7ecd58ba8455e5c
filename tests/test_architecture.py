"""The shape of the code, checked over its syntax trees: short functions, layered imports, no private reads.

These rules keep featx easy to change (see docs/development.md): a function
reads on one screen, data flows one way between modules, and no module
reaches into another object's private state.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featx"
#: Longest function, in lines of code (its docstring not counted: numpydoc docstrings are long by design).
MAX_FUNCTION_LINES = 60


_PACKAGES: set[str] = set()  # modules that are packages (their __init__)


def _modules() -> dict[str, ast.Module]:
    """``{"featx._runtime.runner": tree, "featx": tree of __init__, ...}``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] == "__init__":
            _PACKAGES.add(name)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    doc = 0
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        doc = first.end_lineno - first.lineno + 1
    return fn.end_lineno - fn.lineno + 1 - doc


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The featx modules ``name`` imports anywhere (top level, inside functions, and PEP 562 lazy names)."""
    package = name if name == "featx" or name in _PACKAGES else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "featx"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, base]) if base else package
            if base.split(".")[0] != "featx":
                continue
            for a in node.names:  # `from . import x` imports the submodule x, or a name of the package
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and name == "featx":
            if node.value.startswith(".") and f"featx{node.value}" in known:  # _LAZY's module paths
                found.add(f"featx{node.value}")
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_function_is_longer_than_a_screen():
    long = [f"{name}.{fn.name} ({_code_lines(fn)} lines)" for name, tree in _modules().items()
            for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _code_lines(fn) > MAX_FUNCTION_LINES]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines of code: {long}"


def test_import_graph_has_layers():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_the_package_itself():
    graph = _graph()
    offenders = sorted(n for n, deps in graph.items() if "featx" in deps and n != "featx.__main__")
    assert offenders == [], f"these modules import featx (its __init__) instead of the module they need: {offenders}"


def test_no_module_reads_another_objects_private_attributes():
    reads = []
    for name, tree in _modules().items():
        modules = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in modules):
                    continue  # its own state, or a module's function (sys._getframe)
                reads.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")
                  and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                  and str(node.args[1].value).startswith("_") and not str(node.args[1].value).startswith("__")):
                if not (isinstance(node.args[0], ast.Name) and node.args[0].id == "self"):
                    reads.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert reads == [], f"private attributes of other objects read: {reads}"


#: The layers of featx, bottom to top: a module may import its own subpackage and the layers below it.
BASE = {"featx._exceptions", "featx._options", "featx._version"}
LAYERS = [
    ("base", BASE),
    ("leaves", {"featx._images", "featx._models", "featx._cache"}),  # none imports another leaf
    ("engine", {"featx._runtime"}),
]


def _layer_of(module: str) -> tuple[int, str]:
    """``(layer index, subpackage)`` of a module; the estimators and apps on top are ``(len(LAYERS), module)``."""
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or module.startswith(m + "."):
                return i, m
    return len(LAYERS), module


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        li, own = _layer_of(mod)
        for dep in deps:
            lj, theirs = _layer_of(dep)
            if lj > li or (lj == li and li < len(LAYERS) and theirs != own):
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def test_subpackages_import_only_the_layers_below_them():
    assert _layer_violations(_graph()) == []


def test_the_estimator_uses_the_engine_through_its_front_door():
    """``PretrainedFeatureExtractor`` settles through ``featx._runtime`` and reads none of its modules."""
    deps = _graph()["featx._extractor"]
    assert "featx._runtime" in deps
    assert sorted(d for d in deps if d.startswith(("featx._runtime.", "featx._models", "featx._cache"))) == []


def test_the_layer_check_can_fail():
    assert _layer_violations({"featx._models.layers": {"featx._runtime.device"}}) == [
        "featx._models.layers -> featx._runtime.device"]
    assert _layer_violations({"featx._cache.sqlite": {"featx._images.preprocess"}}) == [
        "featx._cache.sqlite -> featx._images.preprocess"]
    assert _layer_violations({"featx._runtime.runner": {"featx._cache.sqlite", "featx._exceptions"}}) == []


# ------------------------------------------------------- the checks can fail


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("source, expected", [
    ("from . import _extractor", {"featx._extractor"}),
    ("from ._runtime import runner", {"featx._runtime.runner"}),
    ("from . import __version__", {"featx"}),
    ("def f():\n    from ._cache.sqlite import x", {"featx._cache.sqlite"}),
    ("import featx", {"featx"}),
    ("from featx._extractor import P", {"featx._extractor"}),
])
def test_import_reader_sees_every_kind_of_import(source, expected):
    known = {"featx", "featx._runtime", "featx._runtime.runner", "featx._cache.sqlite", "featx._extractor", "featx.cli"}
    assert _imports("featx.cli", ast.parse(source), known) == expected


def test_line_counter_leaves_out_the_docstring_only():
    fn = ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n    return a\n').body[0]
    assert _code_lines(fn) == 3
