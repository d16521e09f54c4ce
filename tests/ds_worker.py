"""DeepSpeed ZeRO scenarios for tests/test_deepspeed.py, run with ``DS_ACCELERATOR=cpu torchrun --nproc-per-node 2``.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ds_worker.py {train,resume} OUT_DIR

``train``: for ZeRO stages 1, 2 and 3, AdamNX as DeepSpeed's client optimizer trains the tiny float32 MLP of
dist_worker on the same global batches as ``reference_run`` (8 rows per rank); halfway it saves a DeepSpeed
checkpoint and trains on. ``resume`` (new processes): a fresh engine per stage loads that checkpoint and trains the
second half. Rank 0 writes, per stage, the full parameters, one coordinate's trajectory and what DeepSpeed did to
the optimizer (its param groups, state, step counters and every call of ``AdamNX.step``) to OUT_DIR/stage{N}/.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import dist_worker

STAGES = (1, 2, 3)
STEPS = dist_worker.STEPS
HALF = STEPS // 2
LR = dist_worker.LR
COORD = (0, 0)  # the coordinate whose trajectory is recorded: weight[0, 0] of the first Linear


def make_model() -> nn.Module:
    return dist_worker.make_model().float()


def reference_run(steps: int = STEPS) -> tuple[list[torch.Tensor], list[float]]:
    """One process, full global batches, float32: final params and the trajectory of weight[COORD]."""
    from adamnx import AdamNX

    model = make_model()
    opt = AdamNX(model.parameters(), lr=LR)
    trajectory = []
    for step in range(steps):
        x, y = dist_worker.batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.float()), y.float()).backward()
        opt.step()
        trajectory.append(model[0].weight[COORD].item())
    return [p.detach().clone() for p in model.parameters()], trajectory


def config(stage: int, world: int) -> dict:
    micro = dist_worker.GLOBAL_BATCH // world
    return {
        "train_batch_size": dist_worker.GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default (1.0) clips the global gradient norm: not AdamNX's step
        "steps_per_print": 10**9,
    }


def _full_params(engine, stage: int) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if stage < 3:  # ZeRO 1/2 keep full module params (updated from the fp32 partitions after each step)
        return [p.detach().clone() for p in params]
    with deepspeed.zero.GatheredParameters(params):  # ZeRO 3 partitions the module params: gather them
        return [p.detach().clone() for p in params]


def _describe(opt) -> dict:
    """What DeepSpeed left in the client optimizer: its groups (keys, params) and its state (keys, step counters)."""
    groups = [
        {"keys": sorted(k for k in g if k != "params"), "param_shapes": [list(p.shape) for p in g["params"]]}
        for g in opt.param_groups
    ]
    states = [
        {
            "keys": sorted(s),
            "step": float(s["step"]),
            "step_dtype": str(s["step"].dtype),
            "step_shape": list(s["step"].shape),
            "numel": s["exp_avg"].numel(),
        }
        for s in opt.state.values()
    ]
    return {"type": type(opt).__name__, "groups": groups, "states": states}


class Recorder:
    """Every call of the client optimizer's step, with the phase it came in and the params it was handed."""

    def __init__(self, opt) -> None:
        self.phase = "construct"
        self.calls: list[dict] = []
        opt.register_step_pre_hook(self._hook)

    def _hook(self, opt, args, kwargs) -> None:
        shapes = [[list(p.shape) for p in g["params"]] for g in opt.param_groups]
        self.calls.append({"phase": self.phase, "group_param_shapes": shapes})


def _engine(stage: int, world: int):
    import deepspeed

    from adamnx import AdamNX

    model = make_model()
    opt = AdamNX(model.parameters(), lr=LR)
    before = sorted(k for k in opt.param_groups[0] if k != "params")
    recorder = Recorder(opt)
    recorder.phase = "initialize"
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage, world))
    info = {
        "wrapper": type(ds_opt).__name__,
        "client_is_inner": ds_opt.optimizer is opt,
        "group_keys_before": before,
        "after_initialize": _describe(opt),
    }
    return engine, opt, recorder, info


def _train(engine, stage, rank, world, start, stop, trajectory):
    for step in range(start, stop):
        x, y = dist_worker.local_batch(step, rank, world)
        loss = nn.functional.mse_loss(engine(x.float()), y.float())
        engine.backward(loss)
        engine.step()
        trajectory.append(_full_params(engine, stage)[0][COORD].item())


def _write(out: Path, rank: int, params, info) -> None:
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(params, out / "params.pt")
        (out / "info.json").write_text(json.dumps(info, indent=1))


def train(stage, rank, world, out):
    engine, opt, recorder, info = _engine(stage, world)
    trajectory: list[float] = []
    recorder.phase = "train"
    _train(engine, stage, rank, world, 0, HALF, trajectory)
    recorder.phase = "save"
    engine.save_checkpoint(str(out / "ckpt"), tag="half")
    info["at_save"] = _describe(opt)
    recorder.phase = "train"
    _train(engine, stage, rank, world, HALF, STEPS, trajectory)
    info.update(trajectory=trajectory, calls=recorder.calls, at_end=_describe(opt))
    _write(out, rank, _full_params(engine, stage), info)


def resume(stage, rank, world, out):
    engine, opt, recorder, info = _engine(stage, world)
    recorder.phase = "load"
    path, _ = engine.load_checkpoint(str(out / "ckpt"), tag="half")
    assert path is not None, "DeepSpeed found no checkpoint"
    info["after_load"] = _describe(opt)
    info["after_load_params"] = [p.tolist() for p in _full_params(engine, stage)]
    trajectory: list[float] = []
    recorder.phase = "train"
    _train(engine, stage, rank, world, HALF, STEPS, trajectory)
    info.update(trajectory=trajectory, calls=recorder.calls, at_end=_describe(opt))
    _write(out / "resumed", rank, _full_params(engine, stage), info)


SCENARIOS = {"train": train, "resume": resume}


if __name__ == "__main__":
    import deepspeed.ops

    # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce (minutes of C++ on 2 cores, into
    # ~/.cache) when its comm backend starts, for inference_all_reduce only: training uses torch.distributed.
    # Declaring no op buildable (the probe's cached answer) skips it.
    deepspeed.ops.__compatible_ops__ = {}
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.use_deterministic_algorithms(True)
    try:
        for stage in STAGES:
            SCENARIOS[scenario](stage, rank, world, out_dir / f"stage{stage}")
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
