"""AdamNX as DeepSpeed's client optimizer under ZeRO stages 1, 2 and 3 (CPU accelerator, gloo, 2 processes).

Two torchrun launches serve every test here (starting torch + deepspeed costs seconds): ``train`` runs all three
stages, checkpointing halfway, and ``resume`` (new processes) loads each checkpoint and finishes. See ds_worker.py.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ds_worker
import launch

# (find_spec, not importorskip: deepspeed is imported by the workers only, never into the test process)
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the deepspeed extra)"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.slow,
]

WORKER = str(Path(__file__).with_name("ds_worker.py"))
# fp32 parameters trained on two ranks vs one process: DeepSpeed averages the two ranks' gradients (each the mean
# over 8 rows) in fp32, the single process takes one mean over 16 rows; the sums differ by about an ulp (6e-8
# relative), and Adam's normalised step m/√v passes a relative gradient error on at order one per step. Over 8
# steps we measured 1.6e-7 (relative to the largest |param|) on every stage; 1e-6 leaves room and would still catch
# one shifted or extra step (≈ 1e-2 relative here, lr = 1e-2).
RTOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    # TORCH_EXTENSIONS_DIR: should DeepSpeed JIT-build an op after all, it builds into the test's folder
    env = launch.worker_env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(out / "torch_extensions"))
    launch.torchrun(WORKER, ["train", str(out)], timeout=300, env=env)
    launch.torchrun(WORKER, ["resume", str(out)], timeout=300, env=env)  # new processes: the restart
    return out


@pytest.fixture(scope="module")
def reference():
    return ds_worker.reference_run()


def _load(run: Path) -> tuple[list[torch.Tensor], dict]:
    return torch.load(run / "params.pt", weights_only=True), json.loads((run / "info.json").read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("stage", ds_worker.STAGES)
def test_zero_matches_single_process(runs, reference, stage):
    params, info = _load(runs / f"stage{stage}")
    ref_params, ref_trajectory = reference
    assert len(params) == len(ref_params)
    for p, q in zip(params, ref_params):
        assert _rel(p, q) <= RTOL
    # one coordinate after every step: the paper's schedule from t = 1, no step shifted, skipped or added
    scale = max(abs(v) for v in ref_trajectory)
    assert len(info["trajectory"]) == ds_worker.STEPS
    for got, want in zip(info["trajectory"], ref_trajectory):
        assert abs(got - want) <= RTOL * scale


@pytest.mark.parametrize("stage", ds_worker.STAGES)
def test_zero_steps_the_client_optimizer_once_per_step(runs, stage):
    """What DeepSpeed does to AdamNX: no fake step at initialize or save, one step() call per engine step, each on
    one flat fp32 partition per group, and every step counter float64, 0-d and exact."""
    _, info = _load(runs / f"stage{stage}")
    assert info["client_is_inner"]  # the ZeRO wrapper holds our AdamNX itself (engine.optimizer.optimizer)
    assert info["wrapper"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
    assert Counter(c["phase"] for c in info["calls"]) == {"train": ds_worker.STEPS}
    groups = info["after_initialize"]["groups"]
    assert [g["keys"] for g in groups] == [info["group_keys_before"]]  # DeepSpeed adds or drops no group key
    numel = sum(p.numel() for p in ds_worker.make_model().parameters())
    partition = info["at_end"]["states"][0]["numel"]  # this rank's half of the flat fp32 params (ZeRO 1/2: padded)
    assert numel / 2 <= partition <= numel / 2 + 8
    # ZeRO 1/2 put the partition in the group for good; ZeRO 3 empties the group between steps
    assert groups[0]["param_shapes"] == ([] if stage == 3 else [[partition]])
    assert all(call["group_param_shapes"] == [[[partition]]] for call in info["calls"])
    assert info["after_initialize"]["states"] == []  # no state before the first real step
    for phase, step in (("at_save", ds_worker.HALF), ("at_end", ds_worker.STEPS)):
        [state] = info[phase]["states"]
        assert state["keys"] == ["exp_avg", "exp_avg_sq", "step"]
        assert (state["step"], state["step_dtype"], state["step_shape"]) == (step, "torch.float64", [])


@pytest.mark.parametrize("stage", ds_worker.STAGES)
def test_zero_checkpoint_restart_continues_exactly(runs, stage):
    """engine.save_checkpoint halfway, new processes, engine.load_checkpoint, continue: the uninterrupted run's
    numbers bit for bit (the same ops in the same order; ZeRO restores the fp32 partitions from the checkpoint),
    and the step counter exact after the load (AdamNX.load_state_dict ran, with its checks: no fake step)."""
    params, info = _load(runs / f"stage{stage}")
    resumed_params, resumed = _load(runs / f"stage{stage}" / "resumed")
    [state] = resumed["after_load"]["states"]
    assert (state["step"], state["step_dtype"], state["step_shape"]) == (ds_worker.HALF, "torch.float64", [])
    assert Counter(c["phase"] for c in resumed["calls"]) == {"train": ds_worker.STEPS - ds_worker.HALF}
    assert resumed["trajectory"] == info["trajectory"][ds_worker.HALF :]
    for p, q in zip(resumed_params, params):
        assert torch.equal(p, q)
    [state] = resumed["at_end"]["states"]
    assert state["step"] == ds_worker.STEPS
