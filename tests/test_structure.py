"""The package's structure: no module imports itself back through others, eagerly or lazily; every backend is
tested; a backend is one module and one row; the optimizer names no backend."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import adamnx
from adamnx.backends import BACKENDS
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
    """A row of adamnx.backends.BACKENDS is an implementation of tests/helpers.py, with its capturable=True variant
    where it runs one, so every test parametrized over the table runs it."""
    for name, backend in BACKENDS.items():
        assert IMPLEMENTATIONS[name].backend is backend and IMPLEMENTATIONS[name].kwargs == dict(backend.options)
        assert not backend.capturable or any(
            impl.backend is backend and impl.kwargs.get("capturable") for impl in IMPLEMENTATIONS.values()
        ), name


def test_the_bench_times_and_stresses_every_backend_row():
    """`adamnx perf` and `adamnx stress` take their AdamNX candidates from the same table: the implementation of a new
    row (its options; on the device it steps) is timed, with and without the late-activation guard, and stressed, with
    nothing else to edit."""
    from adamnx.bench.optimizers import implementation_options
    from adamnx.bench.perf import _candidates
    from adamnx.bench.stress import CANDIDATES

    options = implementation_options()
    assert {tuple(b.options.items()) for b in BACKENDS.values()} == {tuple(o.items()) for o in options.values()}
    for name in options:
        assert {f"adamnx-{name}", f"adamnx-{name}-guard"} <= set(_candidates()), name
        assert {f"adamnx-{name}", f"adamnx-{name}+guard"} <= set(CANDIDATES), name


def test_the_optimizer_and_the_planner_name_no_backend():
    """Which implementation runs, and what it supports, is read from the table: the optimizer, the functional form,
    the validation and the planner never name a row or an executor module."""
    options = {key for backend in BACKENDS.values() for key in backend.options}  # a group's flags, not rows
    names = [name for name in BACKENDS if name not in options]
    names += ["_cpu_extension", "fused_cpu", "fused_inductor", "backends.loop", "backends.foreach"]
    for module in ("optimizer.py", "functional.py", "_validation.py", "plan.py", "guard.py", "update.py"):
        code = "\n".join(
            line for line in (PACKAGE / module).read_text().splitlines() if not line.lstrip().startswith("#")
        )
        code = re.sub(r'""".*?"""', "", code, flags=re.S)  # docstrings may say what the rows are
        for name in names:
            assert not re.search(rf"[\"'.]{re.escape(name)}[\"'.(\s]", code), f"{module} names {name!r}"


def test_a_backend_registered_from_the_tests_alone_runs_the_whole_battery():
    """tests/toy_backend.py (one module, one row) registers a throwaway executor; every test parametrized over the
    implementations then runs on it too (here filtered to it). It passes them all."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "toy_backend", "-k", "toy", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        env=env,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 150, summary  # parity, hardening, checkpoints, the guard, golden trajectories, ...
