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
