"""AdamNX under torch.distributed on CPU (gloo, 2 processes started by torchrun on loopback, bounded in time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dist_worker
import launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
WORKER = str(Path(__file__).with_name("dist_worker.py"))


def torchrun(scenario: str, out: Path, nproc: int = 2, timeout: int = 180) -> None:
    launch.torchrun(WORKER, [scenario, str(out)], nproc=nproc, timeout=timeout)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_matches_reference(out: Path, tol: float) -> None:
    params = torch.load(out / "params.pt", weights_only=True)
    reference = dist_worker.reference_run()
    assert len(params) == len(reference)
    for p, q in zip(params, reference):
        assert _rel(p, q) <= tol


def test_ddp_matches_single_process(tmp_path):
    torchrun("ddp", tmp_path)
    _assert_matches_reference(tmp_path, 1e-6)


def test_ddp_with_8bit_state_matches_single_process(tmp_path):
    """AdamNX8bit under DDP: every rank holds the same codes, and the run matches one process on full batches (the
    all-reduced gradient differs from the full batch's in the last float32 bits: a rounding may go the other way)."""
    torchrun("ddp_8bit", tmp_path)
    assert json.loads((tmp_path / "extra.json").read_text())["ranks_agree"]
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    model = dist_worker.make_model().float()
    dist_worker.run_8bit(model)
    for p, q in zip(params, model.parameters()):
        assert _rel(p, q.detach()) <= 1e-3


def _8bit_reference(**opt_kwargs) -> list[torch.Tensor]:
    """One process, full batches, the same seeds: AdamNX8bit's blocks over whole tensors."""
    from adamnx import AdamNX8bit

    model = dist_worker.make_8bit_model()
    opt = AdamNX8bit(model.parameters(), lr=dist_worker.LR, min_8bit_size=256, **opt_kwargs)
    dist_worker.train_8bit(model, opt, dist_worker.STEPS)
    return [p.detach() for p in model.parameters()]


_8BIT_RUNS = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "guarded": {"fused": True, "per_coordinate_steps": True}}  # fmt: skip


@pytest.mark.parametrize("run", sorted(_8BIT_RUNS))
def test_fsdp2_with_8bit_state_keeps_blocks_per_shard_and_matches_one_process(tmp_path, run):
    """AdamNX8bit on FSDP2 (2 processes): codes are DTensors placed like the params, scales one row per shard (a
    block never straddles two ranks). The run is as close to float32 AdamNX as one process's 8-bit run is (~2% of
    how far the weights moved, measured as norms), and as close to that run: its blocks and random numbers differ
    (the 50-row weight's shards each end in a partial block), so the 8-bit rounding's noise differs."""
    from adamnx import AdamNX

    torchrun(f"fsdp2_8bit_{run}", tmp_path)
    layout = json.loads((tmp_path / "extra.json").read_text())
    assert layout["first"] == {"codes": ["DTensor", [64, 64], "torch.int8"], "scales": ["DTensor", [2, 8]],
                               "local_scales": [1, 8]}  # fmt: skip
    assert layout["second"]["scales"] == ["DTensor", [2, 7]]  # 25 rows of 64: 6.25 blocks per shard
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    one_process = _8bit_reference(**_8BIT_RUNS[run])
    model = dist_worker.make_8bit_model()
    guard = _8BIT_RUNS[run].get("per_coordinate_steps", False)
    float32 = AdamNX(model.parameters(), lr=dist_worker.LR, per_coordinate_steps=guard)
    dist_worker.train_8bit(model, float32, dist_worker.STEPS)
    start = dist_worker.make_8bit_model().parameters()
    for p, q, f, p0 in zip(params, one_process, model.parameters(), start):
        moved = (f - p0).norm()
        assert torch.isfinite(p).all()
        assert (p - f).norm() <= 0.05 * moved and (q - f).norm() <= 0.05 * moved
        assert (p - q).norm() <= 0.05 * moved


def test_distributed_checkpoint_of_8bit_state_continues_bitwise_and_refuses_another_sharding(tmp_path):
    torchrun("dcp_save_8bit", tmp_path)
    torchrun("dcp_load_8bit", tmp_path)  # new processes: the restart
    probe = json.loads((tmp_path / "extra.json").read_text())
    assert probe["steps_after_load"] == [dist_worker.STEPS // 2]
    assert probe["first"]["scales"] == ["DTensor", [2, 8]]
    for p, q in zip(torch.load(tmp_path / "params.pt", weights_only=True),
                    torch.load(tmp_path / "uninterrupted.pt", weights_only=True)):  # fmt: skip
        assert torch.equal(p, q)
    # one process: its one shard has other blocks (scales 1 × 16 against 2 × 8): DCP refuses, nothing is changed
    torchrun("dcp_load_8bit", tmp_path, nproc=1)
    probe = json.loads((tmp_path / "extra.json").read_text())
    assert "Size mismatch" in probe["refused"] and "exp_avg_absmax" in probe["refused"]
    assert probe["untouched"]


def test_fsdp2_8bit_state_converts_from_and_to_float_and_refuses_what_does_not_fit(tmp_path):
    torchrun("fsdp2_8bit_conversions_and_refusals", tmp_path)
    found = json.loads((tmp_path / "extra.json").read_text())
    assert found["to_8bit"] == ["DTensor", [2, 8]] and found["within_one_code"]
    assert found["back_exact"] and found["back_type"] == "DTensor"
    assert "plain tensor but the parameter is a DTensor" in found["plain_refused"] and found["untouched"]
    assert "sharded along dim 0" in found["columns_refused"]


def test_fsdp2_float_state_must_be_sharded_and_a_first_step_counts_on_every_rank(tmp_path):
    torchrun("fsdp2_float_state_placement_and_first_step", tmp_path)
    found = json.loads((tmp_path / "extra.json").read_text())
    assert "plain tensor but the parameter is a DTensor" in found["plain_refused"] and found["untouched"]
    assert "full_state_dict=True" in found["plain_refused"]
    assert found["full_loaded"]
    assert found["first_steps"] == [1, 1]


def test_fsdp2_ranks_skip_alike_and_shards_round_apart(tmp_path):
    torchrun("fsdp2_ranks_decide_alike", tmp_path, timeout=120)
    found = json.loads((tmp_path / "extra.json").read_text())
    assert found["skipped"] == [2, 2]  # the third step skipped on both ranks
    assert found["all_reduces_per_step"] == 1
    assert found["skipped_first_at_lr_0"] == [None, None]  # skipped before any state, on both: no hang
    assert found["shards_round_apart"]


def test_replicas_round_alike_whatever_each_rank_seeds(tmp_path):
    torchrun("ddp_own_seeds", tmp_path)
    assert json.loads((tmp_path / "extra.json").read_text()) == {
        "8bit-fused": True,
        "8bit-foreach": True,
        "bf16-sr": True,
    }


def test_gradient_release_is_refused_under_ddp_and_changes_nothing(tmp_path):
    torchrun("ddp_gradient_release", tmp_path)
    assert "DDP" in json.loads((tmp_path / "extra.json").read_text())["refusal"]
    _assert_matches_reference(tmp_path, 1e-6)


def test_fsdp2_runs_foreach_on_dtensors_and_matches(tmp_path):
    torchrun("fsdp2", tmp_path)
    _assert_matches_reference(tmp_path, 1e-5)
    seen = json.loads((tmp_path / "extra.json").read_text())["foreach_param_types"]
    assert seen and all(types == ["DTensor"] for types in seen)  # the foreach kernel ran on DTensors


def test_fsdp2_with_fused_step_matches(tmp_path):
    torchrun("fsdp2_fused", tmp_path)
    _assert_matches_reference(tmp_path, 1e-12)  # float64 model: the fused kernel is exact to rounding
    assert json.loads((tmp_path / "extra.json").read_text())["param_types"] == ["DTensor"]


def test_fsdp2_with_the_guard_on_dtensors_matches(tmp_path):
    torchrun("fsdp2_guard", tmp_path)
    reference = dist_worker.reference_run(per_coordinate_steps=True)
    for foreach in (True, False):
        params = torch.load(tmp_path / f"params-foreach-{foreach}.pt", weights_only=True)
        for p, q in zip(params, reference):
            assert _rel(p, q) <= 1e-5


def test_zero_redundancy_optimizer_matches(tmp_path):
    torchrun("zero", tmp_path)
    _assert_matches_reference(tmp_path, 1e-6)
    assert set(json.loads((tmp_path / "extra.json").read_text())["steps"]) == {dist_worker.STEPS}


def test_distributed_checkpoint_restart_continues_exactly(tmp_path):
    torchrun("dcp_save", tmp_path)
    torchrun("dcp_load", tmp_path)  # new processes: the restart
    _assert_matches_reference(tmp_path, 1e-6)
    probe = json.loads((tmp_path / "extra.json").read_text())
    assert probe["params_unchanged"]  # the fake step did not move the parameters
    assert probe["steps_after_fake_step"] == [0]  # ... nor count as a step
    assert probe["steps_after_load"] == [dist_worker.STEPS // 2]


def test_distributed_checkpoint_restart_with_the_guard_keeps_every_coordinates_count(tmp_path):
    """FSDP2, per_coordinate_steps, weight columns that start at step 4: the counts are DTensors through DCP (its
    template, from the fake step, names them), and the run continues as one process's."""
    torchrun("dcp_save_guard", tmp_path)
    torchrun("dcp_load_guard", tmp_path)
    probe = json.loads((tmp_path / "extra.json").read_text())
    assert probe["first_layer_counts"] == [1, dist_worker.STEPS // 2] and probe["counts_type"] == "DTensor"
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    for p, q in zip(params, dist_worker.reference_run(late=True, per_coordinate_steps=True)):
        assert _rel(p, q) <= 1e-5


def test_fake_state_init_step_does_not_shift_the_schedule(tmp_path):
    torchrun("fresh_dcp_probe", tmp_path)
    _assert_matches_reference(tmp_path, 1e-6)


def test_bench_runs_data_parallel_under_torchrun(tmp_path):
    torchrun("bench_ddp", tmp_path, timeout=240)
    env = json.loads((tmp_path / "bench" / "environment.json").read_text())
    assert env["processes"] == 2
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "2 processes" in report and "| AdamNX |" in report


def test_cli_nproc_relaunches_under_torchrun(tmp_path, capfd):
    from adamnx.cli import main

    argv = [
        "bench",
        "--nproc",
        "2",
        "--task",
        "digits",
        "--quick",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--set",
        "optimizers=['adamnx']",
        "--set",
        "seeds=[0]",
        "--set",
        "steps=20",
    ]
    code = main(argv)
    output = capfd.readouterr()
    if code != 0 and "SIGABRT" in output.err:  # the rare gloo start-up abort (see torchrun above): once more
        code = main(argv)
        output = capfd.readouterr()
    assert code == 0, output.err[-4000:]
    assert json.loads((tmp_path / "environment.json").read_text())["processes"] == 2
    assert (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_two_node_rehearsal_equals_one_node(tmp_path):
    """Two torchrun "nodes" (one process each, static rendezvous on 127.0.0.1, as on real machines with the master's
    address) run the DDP parity job and the harness (stopped after one evaluation, then ``--resume``): the same
    numbers as one node with two processes. Only global rank 0 (node 0's process) writes files, into node 0's
    folder; node 1 resumes from what rank 0 broadcasts, not from a folder of its own."""
    single, nodes = tmp_path / "single", [tmp_path / "node0", tmp_path / "node1"]
    for d in (single, *nodes):
        d.mkdir()
    torchrun("ddp_and_bench", single, timeout=240)
    launch.torchrun_nodes([WORKER, "ddp_and_bench", str(tmp_path / "node{node}")], logs=tmp_path)

    assert list(nodes[1].iterdir()) == []  # node 1 (rank 1) wrote nothing: no params, no report
    multi = nodes[0]
    _assert_matches_reference(multi, 1e-6)
    for p, q in zip(torch.load(multi / "params.pt"), torch.load(single / "params.pt")):
        assert torch.equal(p, q)  # the same 2-rank gloo all-reduce over TCP, whether loopback or between "nodes"

    def numbers(run: Path) -> tuple[str, str]:  # as text: a NaN metric (no std over < 20 evals) equals itself
        results = json.loads((run / "bench" / "results.json").read_text())
        for r in results:
            r.pop("wall_time_s")
        return json.dumps(results, sort_keys=True), (run / "bench" / "metrics.jsonl").read_text()

    assert numbers(multi) == numbers(single)
    assert json.loads((multi / "bench" / "environment.json").read_text())["processes"] == 2
    assert "2 processes" in (multi / "bench" / "report.md").read_text()
