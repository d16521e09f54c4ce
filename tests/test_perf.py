"""`adamnx perf` / benchmarks/step_speed.py: a tiny end-to-end run, the paired ratios and the target table."""

from __future__ import annotations

import json

import pytest

from adamnx.bench import perf
from adamnx.cli import main


def test_perf_runs_every_candidate_and_writes_json_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["perf", "--sizes", "2e4", "--shapes", "large,small,embedding", "--reps", "2", "--rounds", "2"]
    argv += ["--peak-gbps", "100"]
    assert main([*argv, "--memory-size", "0", "--no-compile-probe", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "step_speed.json").read_text())
    rows = results["rows"]
    assert {r["candidate"] for r in rows} == set(perf._candidates())
    assert {r["shape"] for r in rows} == {"large", "small", "embedding"} and results["rounds"] == 2
    assert all(v > 0 for v in results["stream_gb_per_s"].values())  # the yardstick: a += b at that size
    for r in rows:
        assert r["median_ms"] > 0 and r["gb_per_s"] > 0
        assert r["fraction_of_peak_bandwidth"] == pytest.approx(r["gb_per_s"] / 100)
        guard = r["candidate"].endswith("-guard")  # compared with the same implementation without the guard
        paired = r["paired_ratio_to_adamw_same_impl"]
        assert (paired is not None) == (r["candidate"].startswith("adamnx-") and not guard)
        if paired is not None:
            assert paired > 0 and len(r["round_ratios_to_adamw_same_impl"]) == 2
        assert (r["paired_ratio_to_unguarded"] is not None) == guard
        if guard:
            assert r["paired_ratio_to_unguarded"] > 0
    assert (tmp_path / "step_speed.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "step_speed.md").read_text()
    assert "| large |" in markdown and "% peak |" in markdown and "| embedding |" in markdown
    assert "](step_speed.png)](step_speed.png)" in markdown


def test_target_table_uses_the_same_implementation_and_both_ratios():
    def row(name, ms, paired=None, rounds=None):
        return {
            "shape": "large",
            "params": 10_000_000,
            "candidate": name,
            "median_ms": ms,
            "paired_ratio_to_adamw_same_impl": paired,
            "round_ratios_to_adamw_same_impl": rounds,
        }

    rows = [
        row("adamnx-fused", 10.4, 1.03, [1.0, 1.06]),
        row("adamw-fused", 10.0),
        row("adamnx-foreach", 21.0, 0.99, [0.98, 1.1]),
        row("adamw-foreach", 20.0),
        row("adamnx-forloop", 25.0, 1.2, [1.2, 1.3]),
        row("adamw-forloop", 20.0),
    ]
    table = "\n".join(perf._target_lines(rows))
    assert "| adamnx-fused | ≤ 1.05 | 1.04 | 1.03 | 1.00–1.06 | met |" in table
    assert "| adamnx-foreach | ≤ 1.00 | 1.05 | 0.99 | 0.98–1.10 | met (paired) |" in table
    assert "| adamnx-forloop | ≤ 1.00 | 1.25 | 1.20 | 1.20–1.30 | NOT met |" in table
    assert perf._target_lines([{**r, "params": 1_000_000} for r in rows]) == []  # below 10M: no targets


def test_first_step_probe_reports_time_and_memory(tmp_path):
    result = perf.probe("adamnx-fused", "large", 10_000, "cpu", cache_dir=str(tmp_path))
    assert result["first_step_s"] > 0 and "extra_bytes" in result
    assert any((tmp_path / "adamnx").glob("fused_cpu-*.so"))  # the cold probe built the kernel in its own cache


def test_compact_state_candidates_keep_what_they_say_and_are_paired_with_fused_adamw():
    """#23's speed table from `adamnx perf`: 8-bit and bf16 state against torch's fused AdamW with float32 state,
    AdamNX's foreach with bf16 params against AdamW's foreach with bf16 params."""
    import torch

    builders = perf._candidates()
    params = perf._make_params([(64, 64)], torch.device("cpu"))
    opt = builders["adamnx-8bit-fused"](params)
    opt.step()
    assert opt.state[params[0]]["exp_avg_codes"].dtype == torch.int8
    for name in ("adamnx-bf16-fused", "adamnx-bf16-foreach", "adamw-bf16-foreach"):
        opt = builders[name](perf._make_params([(8, 8)], torch.device("cpu")))
        assert all(p.dtype == p.grad.dtype == torch.bfloat16 for p in opt.param_groups[0]["params"])
    assert perf.twin_of("adamnx-8bit-fused") == perf.twin_of("adamnx-bf16state-fused") == "adamw-fused"
    assert perf.twin_of("adamnx-bf16-foreach") == "adamw-bf16-foreach"
    rows = [
        {"shape": "large", "params": 20_000_000, "candidate": name, "median_ms": ms,
         "paired_ratio_to_adamw_same_impl": paired, "round_ratios_to_adamw_same_impl": rounds}
        for name, ms, paired, rounds in (
            ("adamnx-8bit-fused", 20.0, 2.1, [2.1]), ("adamw-fused", 10.0, None, None),
            ("adamnx-bf16-foreach", 18.0, 0.9, [0.9]), ("adamw-bf16-foreach", 20.0, None, None),
        )
    ]  # fmt: skip
    table = "\n".join(perf._target_lines(rows))
    assert "| adamnx-8bit-fused | ≤ 0.75 | 2.00 | 2.10 | 2.10–2.10 | NOT met |" in table
    assert "| adamnx-bf16-foreach | ≤ 1.00 | 0.90 | 0.90 | 0.90–0.90 | met |" in table
