"""The harness on a shared machine: run folders never mixed, resume of every task, Ctrl-C, progress, one source of
learning rates, threads, the registry, the JAX side (resumable, AdaX-W), and reports that cannot mislead."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch

# find_spec, not importorskip: the check imports nothing (mnist1d would pull in scipy and matplotlib, ~1 s that
# every collection pays, `-m "not slow"` included); the tests import what they use
if importlib.util.find_spec("matplotlib") is None or importlib.util.find_spec("mnist1d") is None:
    pytest.skip("needs matplotlib and mnist1d (the bench extra)", allow_module_level=True)

from adamnx.bench import harness, registry
from adamnx.bench.config import load_config, recorded_sweep
from adamnx.bench.harness import choose_lr, run_bench
from adamnx.bench.optimizers import OPTIMIZERS, OptimizerSpec
from adamnx.bench.runner import BenchInterrupted
from adamnx.bench.tasks import TASKS
from adamnx.cli import main
from adamnx.schedule import horizon

TINY = ["--set", "steps=20", "--set", "eval_every=10", "--set", "seeds=[0]", "--set", "hessian_iters=1"]


pytestmark = pytest.mark.usefixtures("in_tmp_path")  # tests/conftest.py: nothing lands in the repository


def _numbers(folder) -> str:
    """Everything a run recorded except its wall time."""
    rows = json.loads((folder / "results.json").read_text())
    return json.dumps([{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows], sort_keys=True)


def test_out_pointing_at_a_run_of_another_config_is_refused_and_names_resume(tmp_path, capsys):
    argv = ["bench", "--task", "digits", "--out", "run", "--set", "optimizers=[adamnx]", *TINY]
    assert main(argv) == 0
    before = _numbers(tmp_path / "run")
    assert main(["bench", "--task", "quadratic", "--out", "run", "--set", "optimizers=[adamnx]", *TINY]) == 2
    err = capsys.readouterr().err
    assert "run already holds a run of another config" in err and "adamnx bench --resume run" in err
    assert main(argv) == 2  # the same config: still not silently reused
    assert "already holds this run" in capsys.readouterr().err
    assert (
        _numbers(tmp_path / "run") == before
        and json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "digits"
    )


def test_ctrl_c_prints_the_resume_command_and_resume_finishes_every_task(tmp_path, capsys, monkeypatch):
    argv = ["bench", "--task", "digits", "--task", "quadratic", "--set", "optimizers=[adamnx,adam]", *TINY]
    assert main([*argv, "--out", "straight"]) == 0
    real, calls = harness.train_one, []

    def interrupted_on_the_third_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "train_one", interrupted_on_the_third_run)
    capsys.readouterr()
    assert main([*argv, "--out", "killed"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == "adamnx: interrupted; continue with: adamnx bench --resume killed"  # one line, no traceback
    assert not (tmp_path / "killed" / "quadratic" / "results.json").exists()
    monkeypatch.setattr(harness, "train_one", real)
    assert main(["bench", "--resume", "killed"]) == 0
    for task in ("digits", "quadratic"):  # both tasks of the interrupted run, to the same numbers
        assert _numbers(tmp_path / "killed" / task) == _numbers(tmp_path / "straight" / task)


def test_progress_is_one_line_per_finished_run_when_not_a_terminal(capsys):
    assert main(["bench", "--task", "digits", "--set", "optimizers=[adamnx,sgdm]", *TINY]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("digits: [")]
    assert len(lines) == 2 and "[1/2] AdamNX seed 0" in lines[0] and "[2/2] SGD + momentum seed 0" in lines[1]


def test_sweep_shows_progress_and_writes_the_shipped_format(tmp_path, capsys):
    argv = ["bench", "--task", "digits", "--sweep", "--out", "sweep", *TINY]
    assert main([*argv, "--set", "optimizers=[adamnx]", "--set", "sweep_lrs=[0.001,0.01]"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] AdamNX lr 0.001" in out and "[2/2] AdamNX lr 0.01" in out and "shipped picks" in out
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    shipped = recorded_sweep("digits")
    assert set(record) >= set(shipped) and record["grid"] == ["0.001", "0.01"]


@pytest.mark.parametrize("task", ["mnist1d", "digits", "quadratic"])
def test_the_configs_learning_rates_are_the_recorded_sweeps_picks(task):
    """One source of truth: the config reads its lrs from the sweep record, whose picks follow from its scores."""
    sweep = recorded_sweep(task)
    cfg = load_config(task)
    assert cfg.lr == sweep["chosen_lr"] and [f"{lr:g}" for lr in cfg.sweep_lrs] == sweep["grid"]
    for optimizer, scores in sweep["validation_metric"].items():
        assert list(scores) == sweep["grid"]
        assert choose_lr(scores, TASKS[task].higher_is_better) == sweep["chosen_lr"][optimizer]


def test_sweep_ties_go_to_the_smaller_lr_and_nan_never_wins():
    assert choose_lr({"0.001": 0.9, "0.01": 0.9, "0.1": float("nan")}, True) == 0.001
    assert choose_lr({"0.001": 2.0, "0.01": float("nan")}, False) == 0.001


def test_optimizers_list_takes_bare_words():
    assert load_config("digits", ["optimizers=[adamnx]"]).optimizers == ["adamnx"]
    assert load_config("digits", ["optimizers=[adamnx, sgdm]"]).optimizers == ["adamnx", "sgdm"]
    assert load_config("digits", ["optimizers=['adamnx']"]).optimizers == ["adamnx"]


def test_threads_are_set_before_training_and_recorded(tmp_path):
    cfg = load_config("digits", ["steps=5", "eval_every=5", "seeds=[0]", "optimizers=[adamnx]", "threads=1"])
    assert load_config("digits").threads == 1  # the default: see benchmarks/results/threads
    run_bench(cfg, tmp_path / "run", progress=False)
    assert torch.get_num_threads() == 1
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["torch threads"] == 1
    assert "1 torch thread each" in (tmp_path / "run" / "report.md").read_text()


def test_the_registry_names_what_the_modules_hold():
    assert tuple(TASKS) == registry.TASK_NAMES
    assert set(OPTIMIZERS) == set(registry.DISPLAY_NAMES)
    assert set(registry.DEFAULT_OPTIMIZERS) | set(registry.ABLATION_OPTIMIZERS) | set(registry.COMPACT_VARIANTS) == set(
        OPTIMIZERS
    )
    assert set(registry.DEFAULT_TASKS) <= set(TASKS)


# --- the report ---


def _claims(report: str) -> list[str]:
    section = report.split("## What the numbers say about the paper's claims")[1].split("## ")[0]
    return re.findall(r"^(\d+)\. \*\*(.+?)\*\*", section, flags=re.M)


def test_report_leads_with_the_verdict_numbers_claims_without_gaps_and_uses_display_names(tmp_path):
    overrides = ["steps=40", "eval_every=10", "seeds=[0,1]", "optimizers=[adamnx,adam,sgdm]", "hessian_iters=2"]
    run_bench(load_config("digits", overrides), tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    claims = _claims(report)
    assert [int(n) for n, _ in claims] == list(range(1, len(claims) + 1))
    assert claims[0][1].startswith("Outperforms") and claims[1][1].startswith("β̂2 → 1")
    assert "AdamNX ties" in report or "AdamNX beats" in report or "AdamNX loses" in report
    assert "| SGD + momentum |" in report and "| sgdm |" not in report
    assert report.index("## What the numbers say") < report.index("## Results")


def test_compact_state_runs_at_adamnx_lr_and_is_compared_seed_by_seed(tmp_path):
    """adamnx-bf16 and adamnx-8bit need no lr of their own (AdamNX's), are left out of the verdict against Adam and
    its variants, and get their own claim: the paired difference per seed and a paired t-test."""
    overrides = ["steps=30", "eval_every=10", "seeds=[0,1]", "optimizers=[adamnx,adam,adamnx-bf16,adamnx-8bit]",
                 "hessian_iters=0"]  # fmt: skip
    cfg = load_config("digits", overrides)
    assert cfg.lr_for("adamnx-8bit") == cfg.lr_for("adamnx-bf16") == cfg.lr["adamnx"]
    run_bench(cfg, tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    claims = dict((title, n) for n, title in _claims(report))
    assert "Compact state costs accuracy?" in claims
    verdict = report.split("**Outperforms")[1].split("\n")[0]
    assert "AdamNX8bit" not in verdict and "bf16 state" not in verdict
    section = report.split("**Compact state costs accuracy?**")[1].split("\n")[0]
    assert "AdamNX8bit − AdamNX = " in section and "seeds [0, 1]" in section and "paired t-test" in section
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    from adamnx.bench.report import compact_state_differences

    found = compact_state_differences(results)
    by_seed = {(r["optimizer"], r["seed"]): r["test_at_best_val"] for r in results}
    assert found["adamnx-8bit"]["differences"] == [by_seed["adamnx-8bit", s] - by_seed["adamnx", s] for s in (0, 1)]


def test_report_takes_the_horizon_from_the_configured_beta2(tmp_path, monkeypatch):
    spec = OPTIMIZERS["adamnx"]
    monkeypatch.setitem(OPTIMIZERS, "adamnx", OptimizerSpec(spec.build, {**spec.kwargs, "betas": (0.9, 0.95)}, "x"))
    overrides = ["steps=20", "eval_every=10", "seeds=[0]", "optimizers=[adamnx]", "hessian_iters=0"]
    run_bench(load_config("digits", overrides), tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"H ≈ {horizon(0.95):,.0f} steps of β2 = 0.95" in report and "0.99" not in report.split("## Results")[0]


def test_quick_report_has_the_banner_and_no_verdicts(tmp_path):
    cfg = load_config("digits", ["steps=20", "eval_every=10", "optimizers=[adamnx,adam]"], quick=True)
    run_bench(cfg, tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Smoke run: too short for conclusions" in report and _claims(report) == []
    assert not any(word in report for word in ("ties", "beats", "loses", "ranks"))


# --- the JAX side ---


def test_jax_adaxw_matches_its_closed_form():
    """The optax AdaX-W baseline: v_t = (1+β2)v + β2 g², v̂ = v/((1+β2)^t − 1), m an EMA, θ −= η m/(√v̂+ε) + ηλθ."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import optax

    from adamnx.bench.jax_trainer import adaxw

    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=5)
    grads = rng.normal(size=(300, 5)) * rng.uniform(0.1, 3, size=(300, 1))
    lr, wd, b1, b2, eps = 5e-3, 5e-2, 0.9, 1e-4, 1e-12
    with jax.enable_x64(True):
        tx = adaxw(lr, weight_decay=wd)
        params = jax.numpy.asarray(theta0)
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(jax.numpy.asarray(g), state, params)
            params = optax.apply_updates(params, updates)
        params = np.asarray(params)
    theta, m, v = theta0.copy(), np.zeros(5), np.zeros(5)
    for t, g in enumerate(grads, start=1):
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = (1 + b2) * v + b2 * g**2
        theta = theta - lr * m / (np.sqrt(v / ((1 + b2) ** t - 1)) + eps)
    np.testing.assert_allclose(params, theta, rtol=1e-10)


def test_killed_jax_bench_resumes_to_the_same_numbers(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    overrides = [
        "steps=30",
        "eval_every=10",
        "seeds=[0]",
        "optimizers=[adamnx,adaxw]",
        "framework=jax",
        "hessian_iters=2",
    ]
    straight = tmp_path / "straight"
    run_bench(load_config("mnist1d", overrides), straight, progress=False)
    killed = tmp_path / "killed"
    with pytest.raises(BenchInterrupted):
        run_bench(load_config("mnist1d", overrides), killed, progress=False, stop_after_evals=1)
    assert (killed / "runs" / "adamnx-jax-seed0.ckpt").exists()
    run_bench(load_config("mnist1d", overrides), killed, resume=True, progress=False)
    assert _numbers(killed) == _numbers(straight)
    a, b = (json.loads((d / "runs" / "adamnx-jax-seed0.json").read_text()) for d in (straight, killed))
    assert a["evals"] == b["evals"] and a["logs"] == b["logs"] and a["framework"] == "jax"
    assert "adamnx.optax.adamnx(schedule, b1=0.9, b2=0.99, weight_decay=0.01)" in (killed / "report.md").read_text()
