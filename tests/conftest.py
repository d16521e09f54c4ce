"""Test-wide settings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import settings

# In CI, property tests draw the same examples every run (and keep no database): a failure there is reproducible,
# never a flake. Locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# The `slow` marker, so that `python -m pytest -m "not slow"` is a loop of about 45 s on 2 cores for local work (CI
# runs everything). Rather than a decorator on each test: whole modules whose tests start processes, train models or
# draw many examples, every test of the accelerator (inductor) kernel, which compiles it (a row of the shared
# implementation table, so a new test of that row is slow without being marked), single tests and part of one
# parametrized family. What stays fast still runs every other implementation (for-loop, foreach, capturable,
# foreach-capturable, fused CPU) through parity, hardening, per-coordinate and checkpoint tests.
_SLOW_MODULES = {
    "test_bench.py",
    "test_bench_harness.py",
    "test_deepspeed.py",
    "test_distributed.py",
    "test_integrations.py",
    "test_lm.py",
    "test_perf.py",
    "test_properties.py",
    "test_study.py",
}
_SLOW_TESTS = {
    # start processes or build the C++ kernel from scratch
    "test_two_processes_repair_a_truncated_cache_at_once",
    "test_build_is_cached_by_source_torch_version_and_flags",
    "test_matches_for_loop_across_thread_splits",
    "test_importing_adamnx_does_not_import_jax",
    # builds the documentation site (~30 s)
    "test_the_built_site_renders_its_formulas_offline",
    # runs every implementation test on a throwaway backend, in a subprocess (~1 min)
    "test_a_backend_registered_from_the_tests_alone_runs_the_whole_battery",
    # trains the bench's mnist1d model with JAX (~9 s)
    "test_bench_jax_runs_train",
    # torch.compile the step (seconds of compiling; ~2 s for the last one on a cold cache)
    "test_torch_compile_step_matches_eager",
    "test_torch_compile_fullgraph_still_compiles_the_step",
    "test_float32_tensor_lr_on_float64_params_under_torch_compile_loses_no_precision",
    # loop over the implementations inside the test, inductor kernel included, so the "fused-inductor" rule below
    # does not see them: 0.6-3 s each with a warm compile cache, 3-23 s on a cold one
    "test_float64_params_with_float32_state_agree_on_every_path",
    "test_a_one_element_lr_tensor_becomes_0_d_and_steps_on_every_path",
    "test_first_step_has_m_equal_g_and_v_equal_g_squared",
    # a Hypothesis state machine (40 sequences) that draws the inductor row too: 4 s warm, 17 s on a cold cache
    "test_random_sequences_match_the_reference",
}
# A parametrized family of which only some rows are slow. test_float64_matches_reference is 1,000 steps per row,
# 12 hyperparameter rows x 5 implementations (~15 s): the fast loop keeps HYPERPARAMETERS[1::3] (each beta2, with
# and without weight decay and maximize, on every implementation), which with test_float32_matches_reference's
# rows, [::3], is 8 of the 12 rows.
_SLOW_ROWS = {"test_float64_matches_reference"}


def _is_slow(item) -> bool:
    names = {part.partition("[")[0] for part in item.nodeid.split("::")[1:]}  # the test's, and a TestCase's class
    if item.path.name in _SLOW_MODULES or names & _SLOW_TESTS or "fused-inductor" in item.nodeid:
        return True
    if names & _SLOW_ROWS:
        from helpers import HYPERPARAMETERS

        return item.callspec.params["hp"] not in HYPERPARAMETERS[1::3]
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
    _check_names()


def _check_names():
    """Every module and test named above exists: a renamed test would otherwise silently join the fast loop."""
    here = Path(__file__).parent
    defined = {m for f in here.glob("test_*.py") for m in re.findall(r"^\s*(?:def )?(test\w+)\b", f.read_text(), re.M)}
    stale = sorted({m for m in _SLOW_MODULES if not (here / m).is_file()} | ((_SLOW_TESTS | _SLOW_ROWS) - defined))
    if stale:
        raise pytest.UsageError(f"tests/conftest.py marks as slow what does not exist (renamed?): {stale}")


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Run in an empty folder of the test's own (nothing, not even a default runs/ folder, lands in the
    repository) and leave torch's thread count as it was (the harness sets it)."""
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)
