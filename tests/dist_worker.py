"""Multi-process scenarios for tests/test_distributed.py, run with ``torchrun --standalone --nproc-per-node 2``.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py SCENARIO OUT_DIR
Each scenario trains the same tiny float64 MLP on the same global batches as the single-process reference
(``reference_run``) and rank 0 writes its final parameters (full tensors) to OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

STEPS = 8
GLOBAL_BATCH = 16
LR = 1e-2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), torch.randn(
        GLOBAL_BATCH, 2, generator=g, dtype=torch.float64
    )


def local_batch(step: int, rank: int, world: int):
    x, y = batch(step)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def reference_run(steps: int = STEPS, **opt_kwargs) -> list[torch.Tensor]:
    """One process, full global batches: what every distributed run must reproduce."""
    from adamnx import AdamNX

    model = make_model()
    opt = AdamNX(model.parameters(), lr=LR, **opt_kwargs)
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train(model, opt, rank, world, steps, start=0):
    for step in range(start, start + steps):
        x, y = local_batch(step, rank, world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _save_params(model, out: Path, rank: int, extra: dict | None = None) -> None:
    params = [_full(p.detach()).clone() for p in model.parameters()]
    if rank == 0:
        torch.save(params, out / "params.pt")
        if extra is not None:
            (out / "extra.json").write_text(json.dumps(extra))


def ddp(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel

    from adamnx import AdamNX

    model = DistributedDataParallel(make_model())
    opt = AdamNX(model.parameters(), lr=LR, foreach=True)
    _train(model, opt, rank, world, STEPS)
    _save_params(model.module, out, rank)


def ddp_gradient_release(rank, world, out):
    """Gradient release is refused under DDP (its gradients are averaged after the backward pass), and the refusal
    leaves the optimizer as it was: the ordinary loop then matches the single process."""
    from torch.nn.parallel import DistributedDataParallel

    import adamnx
    from adamnx import AdamNX

    model = DistributedDataParallel(make_model())
    opt = AdamNX(model.parameters(), lr=LR, fused=True)
    try:
        adamnx.release_gradients(opt)
        message = None
    except RuntimeError as exc:
        message = str(exc)
    _train(model, opt, rank, world, STEPS)
    _save_params(model.module, out, rank, {"refusal": message})


def fsdp2(rank, world, out):
    import adamnx.backends as backends

    seen = []
    row = backends.BACKENDS["foreach"]

    def recording(plan):
        seen.append(sorted({type(p).__name__ for bucket in plan.buckets for p in bucket.params}))
        return row.execute(plan)

    backends.BACKENDS["foreach"] = dataclasses.replace(row, execute=recording)
    model, opt = _fsdp_model_and_opt(foreach=True)
    _train(model, opt, rank, world, STEPS)
    _save_params(model, out, rank, {"foreach_param_types": seen})


def fsdp2_fused(rank, world, out):
    """fused=True on FSDP2's DTensor shards: the C++ CPU kernel updates each rank's local shard."""
    model, opt = _fsdp_model_and_opt(fused=True)
    _train(model, opt, rank, world, STEPS)
    param_types = sorted({type(p).__name__ for p in model.parameters()})
    _save_params(model, out, rank, {"param_types": param_types})


def zero(rank, world, out):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from adamnx import AdamNX

    model = DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdamNX, lr=LR)
    _train(model, opt, rank, world, STEPS)
    opt.consolidate_state_dict(to=0)
    steps = [int(s["step"]) for s in opt.state_dict()["state"].values()] if rank == 0 else []
    _save_params(model.module, out, rank, {"steps": steps})


def _fsdp_model_and_opt(**opt_kwargs):
    """The test MLP with each Linear and the whole model sharded by FSDP2, and AdamNX over its DTensor params."""
    from torch.distributed.fsdp import fully_shard

    from adamnx import AdamNX

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, AdamNX(model.parameters(), lr=LR, **(opt_kwargs or {"foreach": True}))


def dcp_save(rank, world, out):
    """First half of training, then a distributed checkpoint; a new set of processes continues (dcp_load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _fsdp_model_and_opt()
    _train(model, opt, rank, world, STEPS // 2)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "ckpt"))


def dcp_load(rank, world, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _fsdp_model_and_opt()
    # get_state_dict on a fresh optimizer runs torch's zero-gradient, lr = 0 "fake" step to create the state
    model_sd, optim_sd = get_state_dict(model, opt)
    probe = {
        "steps_after_fake_step": sorted({int(s["step"]) for s in opt.state.values()}),
        "params_unchanged": all(
            torch.equal(_full(p.detach()), q) for p, q in zip(model.parameters(), make_model().parameters())
        ),
    }
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(out / "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    probe["steps_after_load"] = sorted({int(s["step"]) for s in opt.state.values()})
    _train(model, opt, rank, world, STEPS - STEPS // 2, start=STEPS // 2)
    _save_params(model, out, rank, probe)


def fresh_dcp_probe(rank, world, out):
    """The fake step alone, then training from scratch: must equal a run that never saw the fake step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _fsdp_model_and_opt()
    get_optimizer_state_dict(model, opt)
    _train(model, opt, rank, world, STEPS)
    _save_params(model, out, rank)


def bench_ddp(rank, world, out):
    from adamnx.cli import main

    code = main(
        [
            "bench",
            "--task",
            "digits",
            "--quick",
            "--out",
            str(out / "bench"),
            "--no-progress",
            "--set",
            "optimizers=['adamnx','sgdm']",
            "--set",
            "seeds=[0]",
        ]
    )
    if code != 0:
        raise SystemExit(code)


def ddp_and_bench(rank, world, out):
    """The multi-node rehearsal's job: the DDP parity run, then ``adamnx bench --quick`` (small) in the same group,
    stopped after its first evaluation (as if killed) and continued with ``adamnx bench --resume``."""
    from adamnx.bench.config import load_config
    from adamnx.bench.harness import run_bench
    from adamnx.bench.runner import BenchInterrupted
    from adamnx.cli import main

    ddp(rank, world, out)
    overrides = ["optimizers=['adamnx']", "seeds=[0]", "steps=20", "eval_every=10"]
    try:
        run_bench(load_config("digits", overrides, quick=True), out / "bench", progress=False, stop_after_evals=1)
        raise AssertionError("the bench was not interrupted")
    except BenchInterrupted:
        pass
    code = main(["bench", "--resume", str(out / "bench"), "--no-progress"])
    if code != 0:
        raise SystemExit(code)


def run_8bit(model, world_rank_world=None, steps: int = STEPS) -> list[torch.Tensor]:
    """AdamNX8bit (weights of 256 elements quantized: min_8bit_size=64) on the float32 model: with DDP when given
    (rank, world), else one process on full batches. Every rank draws the same random numbers (seeded alike)."""
    from adamnx import AdamNX8bit

    torch.manual_seed(1)
    opt = AdamNX8bit(model.parameters(), lr=LR, min_8bit_size=64)
    for step in range(steps):
        x, y = batch(step) if world_rank_world is None else local_batch(step, *world_rank_world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.float()), y.float()).backward()
        opt.step()
    return opt


def ddp_8bit(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model().float())
    opt = run_8bit(model, (rank, world))
    assert opt.state[model.module[2].weight]["exp_avg"].dtype == torch.int8
    codes = opt.state[model.module[2].weight]["exp_avg_sq"].clone()
    gathered = [torch.empty_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes)
    _save_params(model.module, out, rank, {"ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)})


SCENARIOS = {
    f.__name__: f
    for f in (
        ddp,
        ddp_8bit,
        ddp_gradient_release,
        fsdp2,
        fsdp2_fused,
        zero,
        dcp_save,
        dcp_load,
        fresh_dcp_probe,
        bench_ddp,
        ddp_and_bench,
    )
}


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario != "bench_ddp":  # the harness initialises its own process group
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.use_deterministic_algorithms(True)
    try:
        SCENARIOS[scenario](rank, world, out_dir)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
