"""The horizon study: its β2 points, its p-values, and a tiny sweep + study end to end (digits, tmp_path)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

# find_spec, not importorskip: the check imports nothing (matplotlib is time that every collection would pay,
# `-m "not slow"` included); the tests import what they use
if importlib.util.find_spec("matplotlib") is None:
    pytest.skip("needs matplotlib (the bench extra)", allow_module_level=True)

from adamnx.bench.config import ConfigError, load_config
from adamnx.bench.optimizers import optimizer_spec
from adamnx.bench.study import (
    RATIOS,
    _pvalues,
    horizon_runs,
    run_study,
    run_sweep,
    study_config_overrides,
)
from adamnx.cli import main
from adamnx.schedule import horizon


def test_each_point_has_the_horizon_it_asks_for():
    runs = horizon_runs(3000)
    points = [r for r in runs if r.ratio is not None]
    assert sorted({r.ratio for r in points}) == sorted(RATIOS)
    for r in points:
        assert 3000 / horizon(r.beta2) == pytest.approx(r.ratio, rel=1e-9)
        assert optimizer_spec(r.name).kwargs["betas"] == (0.9, r.beta2)
    pairs = {r.ratio: {p.base for p in points if p.ratio == r.ratio} for r in points}
    assert all(bases == {"adamnx", "adamw"} for bases in pairs.values())
    (band,) = [r for r in runs if r.ratio is None]
    assert band.base == "adamw" and band.beta2 == 0.999
    assert len({r.name for r in runs}) == len(runs) == 9


def test_p_values_match_the_textbook_formulas():
    from scipy import stats  # here, not at the top: scipy.stats is ~0.3 s of every collection

    a = {1: 0.91, 2: 0.93, 3: 0.92, 4: 0.95}
    b = {1: 0.90, 2: 0.91, 3: 0.92, 4: 0.92}
    welch, paired = _pvalues(a, b)
    xa, xb = np.array(list(a.values())), np.array(list(b.values()))
    va, vb = xa.var(ddof=1) / 4, xb.var(ddof=1) / 4
    t = (xa.mean() - xb.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 3)  # Welch–Satterthwaite
    assert welch == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    d = xa - xb
    t_paired = d.mean() / (d.std(ddof=1) / 2)
    assert paired == pytest.approx(2 * stats.t.sf(abs(t_paired), 3), rel=1e-9)
    # pairs are matched by seed, not by position
    shuffled = {4: 0.92, 3: 0.92, 2: 0.91, 1: 0.90}
    assert _pvalues(a, shuffled)[1] == pytest.approx(paired, rel=1e-12)
    assert math.isnan(_pvalues({1: 0.5}, {1: 0.4})[0])


def test_tiny_study_end_to_end(tmp_path):
    overrides = ["steps=30", "seeds=[1,2]", "eval_every=10", "log_every=10"]
    cfg = load_config("digits", study_config_overrides(overrides))
    sweep_file = tmp_path / "sweep.json"
    record = run_sweep(cfg, sweep_file, lrs=(1e-2, 3e-2), progress=False)
    assert set(record["chosen_lr"]) == {r.name for r in horizon_runs(30)}
    assert all(lr in (1e-2, 3e-2) for lr in record["chosen_lr"].values())
    assert record["environment"]["cpu model"]

    out = tmp_path / "study"
    summary = run_study(cfg, sweep_file, out, progress=False)
    assert [p["T/H"] for p in summary["points"]] == sorted(RATIOS)
    for p in summary["points"]:
        assert 0 < p["adamnx_mean"] <= 1 and 0 < p["adamw_mean"] <= 1
        assert p["adamnx_lr"] == record["chosen_lr"][f"adamnx-b2={p['beta2']:.4f}"]
        for key in ("p_welch", "p_paired"):
            assert math.isnan(p[key]) or 0 <= p[key] <= 1
    report = (out / "report.md").read_text()
    assert "| T/H |" in report and "paired p" in report and "cpu model" in report
    assert (out / "horizon.png").read_bytes()[:4] == b"\x89PNG"
    assert "](horizon.png)](horizon.png)" in report
    band_run = json.loads((out / "runs" / "adamw-b2=0.9990-seed1.json").read_text())
    assert band_run["beta2"] == 0.999 and band_run["seed"] == 1
    assert len(list((out / "runs").glob("*.json"))) == 9 * 2

    # the same seed means the same initialisation and batch order: rerunning gives the same numbers (resume-safe)
    again = run_study(cfg, sweep_file, tmp_path / "again", progress=False)
    assert again["points"] == summary["points"]

    # a sweep made for another setup is refused
    other = load_config("digits", study_config_overrides([*overrides, "steps=40"]))
    with pytest.raises(ConfigError, match=r"\(steps, runs differ\)"):
        run_study(other, sweep_file, tmp_path / "other", progress=False)


def test_cli_study_without_a_sweep_says_how_to_make_one(tmp_path, capsys):
    argv = ["bench", "--study", "horizon", "--sweep-file", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "adamnx bench --study horizon --sweep" in err and err.count("\n") == 1
