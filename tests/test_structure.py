"""The package's structure: no module imports itself back through others, eagerly or lazily; every backend is
tested."""

from __future__ import annotations

import ast
from pathlib import Path

import adamnx
from adamnx.functional import BACKENDS, backend_name
from helpers import IMPLEMENTATIONS

PACKAGE = Path(adamnx.__file__).parent

# Cycles still to be untangled, listed so that no new one can appear and a fix must remove its entry. None left: the
# bench's config checks names against bench/registry.py, which imports nothing.
KNOWN_CYCLES: list[set[str]] = []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every adamnx module → the adamnx modules it imports anywhere in its body (function-level imports too)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from adamnx import _fused` names a module; `from adamnx.x import f` names module adamnx.x
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
                targets = [t for t in targets if t in modules][:1] or [node.module]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycles_but_the_known_one():
    cycles = _cycles(_import_graph())
    assert [c for c in cycles if c not in KNOWN_CYCLES] == []
    assert [c for c in KNOWN_CYCLES if c not in cycles] == [], "a known cycle is gone: remove it from KNOWN_CYCLES"


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_every_backend_row_is_run_by_the_test_table():
    """A row of adamnx.functional.BACKENDS is selected by some implementation of tests/helpers.py, with and without
    capturable=True where that runs another path, so every test parametrized over the table runs it."""
    selected = {
        (backend_name(impl.kwargs.get("fused"), impl.kwargs.get("foreach")), impl.kwargs.get("capturable", False))
        for impl in IMPLEMENTATIONS.values()
    }
    for name, backend in BACKENDS.items():
        assert (name, False) in selected, name
        assert not backend.capturable or (name, True) in selected, name
        assert IMPLEMENTATIONS[name].kwargs == dict(backend.options)  # the test names are the table's


def test_the_bench_times_and_stresses_every_backend_row():
    """`adamnx perf` and `adamnx stress` take their AdamNX candidates from the same table: a new row is timed, with
    and without the late-activation guard, and stressed, with nothing else to edit."""
    from adamnx.bench.perf import _candidates
    from adamnx.bench.stress import CANDIDATES

    for name in BACKENDS:
        bench_name = name.replace("-", "")
        assert {f"adamnx-{bench_name}", f"adamnx-{bench_name}-guard"} <= set(_candidates()), name
        assert {f"adamnx-{bench_name}", f"adamnx-{bench_name}+guard"} <= set(CANDIDATES), name
