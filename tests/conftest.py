"""Test-wide settings."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# In CI, property tests draw the same examples every run (and keep no database): a failure there is reproducible,
# never a flake. Locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# The `slow` marker, so that `python -m pytest -m "not slow"` is a loop of about a minute for local work (CI runs
# everything). Rather than a decorator on each test: whole modules whose tests start processes, train models or
# draw many examples, every test of the accelerator (inductor) kernel, which compiles it (a row of the shared
# implementation table, so a new test of that row is slow without being marked), and a few single tests.
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
    "test_two_processes_repair_a_truncated_cache_at_once",
    "test_build_is_cached_by_source_torch_version_and_flags",
    "test_matches_for_loop_across_thread_splits",
    "test_bench_jax_runner_trains",
    "test_importing_adamnx_does_not_import_jax",
    "test_torch_compile_step_matches_eager",
    "test_torch_compile_fullgraph_still_compiles_the_step",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.name in _SLOW_MODULES or name in _SLOW_TESTS or "fused-inductor" in item.nodeid:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Run in an empty folder of the test's own (nothing, not even a default runs/ folder, lands in the
    repository) and leave torch's thread count as it was (the harness sets it)."""
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)
