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


LATE_STEPS = 3  # late=True: input features 0 and 1 are zero for the first 3 steps, so those weight columns start late


def batch(step: int, late: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64)
    if late and step < LATE_STEPS:
        x[:, :2] = 0
    return x, torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)


def local_batch(step: int, rank: int, world: int, late: bool = False):
    x, y = batch(step, late)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def reference_run(steps: int = STEPS, late: bool = False, **opt_kwargs) -> list[torch.Tensor]:
    """One process, full global batches: what every distributed run must reproduce."""
    from adamnx import AdamNX

    model = make_model()
    opt = AdamNX(model.parameters(), lr=LR, **opt_kwargs)
    for step in range(steps):
        x, y = batch(step, late)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train(model, opt, rank, world, steps, start=0, late=False):
    for step in range(start, start + steps):
        x, y = local_batch(step, rank, world, late)
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


def fsdp2_guard(rank, world, out):
    """The late-activation guard on FSDP2's shards (lags per element, DTensors) with foreach and the for-loop: their
    weights are computed from each rank's lags and placed like them (they failed on mixing DTensor and Tensor)."""
    for options in ({"foreach": True}, {"foreach": False}):
        model, opt = _fsdp_model_and_opt(per_coordinate_steps=True, **options)
        _train(model, opt, rank, world, STEPS)
        _save_params(model, out, rank)
        if rank == 0:
            (out / "params.pt").rename(out / f"params-foreach-{options['foreach']}.pt")


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


def _sharded(model: nn.Sequential) -> nn.Sequential:
    """``model`` with each Linear and the whole model sharded by FSDP2 (its params become DTensors)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_model_and_opt(**opt_kwargs):
    """The test MLP sharded by FSDP2, and AdamNX over its DTensor params."""
    from adamnx import AdamNX

    model = _sharded(make_model())
    opt_kwargs = {"lr": LR, **(opt_kwargs or {"foreach": True})}
    return model, AdamNX(model.parameters(), **opt_kwargs)


def dcp_save(rank, world, out, guard=False):
    """First half of training, then a distributed checkpoint; a new set of processes continues (dcp_load). With
    guard: per_coordinate_steps, and weight columns that start late (their counts must survive the restart)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _fsdp_model_and_opt(**({"foreach": True, "per_coordinate_steps": True} if guard else {}))
    _train(model, opt, rank, world, STEPS // 2, late=guard)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "ckpt"))


def dcp_load(rank, world, out, guard=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _fsdp_model_and_opt(**({"foreach": True, "per_coordinate_steps": True} if guard else {}))
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
    if guard:
        counts = opt.coord_steps(model[0].weight)
        probe["first_layer_counts"] = sorted({int(c) for c in _full(counts).unique()})
        probe["counts_type"] = type(counts).__name__
    _train(model, opt, rank, world, STEPS - STEPS // 2, start=STEPS // 2, late=guard)
    _save_params(model, out, rank, probe)


def dcp_save_guard(rank, world, out):
    dcp_save(rank, world, out, guard=True)


def dcp_load_guard(rank, world, out):
    dcp_load(rank, world, out, guard=True)


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
    assert opt.state[model.module[2].weight]["exp_avg_codes"].dtype == torch.int8
    codes = opt.state[model.module[2].weight]["exp_avg_sq_codes"].clone()
    gathered = [torch.empty_like(codes) for _ in range(world)]
    dist.all_gather(gathered, codes)
    _save_params(model.module, out, rank, {"ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered)})


def make_8bit_model() -> nn.Module:
    """float32 layers whose weights AdamNX8bit quantizes (min_8bit_size=256): 64×64 (two shards of 2,048 elements,
    whole blocks), 50×64 (shards of 1,600: each ends in a partial block) and 2×64 (float state)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 50), nn.Tanh(), nn.Linear(50, 2))


def batch_8bit(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 64, generator=g), torch.randn(GLOBAL_BATCH, 2, generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def train_8bit(model, opt, steps: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
    """Every step seeds the random numbers the 8-bit rounding draws (the same on every rank and after a restart)."""
    for step in range(start, start + steps):
        x, y = batch_8bit(step, rank, world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.manual_seed(100 + step)
        opt.step()


def _fsdp_8bit(**opt_kwargs):
    from adamnx import AdamNX8bit

    model = _sharded(make_8bit_model())
    return model, AdamNX8bit(model.parameters(), lr=LR, min_8bit_size=256, **opt_kwargs)


def _8bit_layout(model, opt) -> dict:
    """What the state of the two quantized weights looks like on this rank."""
    out = {}
    for name, layer in (("first", model[0]), ("second", model[2])):
        state = opt.state[layer.weight]
        out[name] = {
            "codes": [
                type(state["exp_avg_codes"]).__name__,
                list(state["exp_avg_codes"].shape),
                str(state["exp_avg_codes"].dtype),
            ],
            "scales": [type(state["exp_avg_absmax"]).__name__, list(state["exp_avg_absmax"].shape)],
            "local_scales": list(state["exp_avg_absmax"].to_local().shape),
        }
    return out


def fsdp2_8bit(rank, world, out, **opt_kwargs):
    """AdamNX8bit on FSDP2's shards: each rank's blocks are its own."""
    model, opt = _fsdp_8bit(**opt_kwargs)
    train_8bit(model, opt, STEPS, rank=rank, world=world)
    _save_params(model, out, rank, _8bit_layout(model, opt))


def fsdp2_8bit_fused(rank, world, out):
    fsdp2_8bit(rank, world, out, fused=True)


def fsdp2_8bit_foreach(rank, world, out):
    fsdp2_8bit(rank, world, out, foreach=True)


def fsdp2_8bit_guarded(rank, world, out):
    """With the late-activation guard: a DTensor's lags are per element, so the kernel hands it to the torch ops."""
    fsdp2_8bit(rank, world, out, fused=True, per_coordinate_steps=True)


def dcp_save_8bit(rank, world, out):
    """Half the training, a distributed checkpoint; and, apart, the whole training uninterrupted (params.pt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = _fsdp_8bit(fused=True)
    train_8bit(model, opt, STEPS // 2, rank=rank, world=world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "ckpt"))
    train_8bit(model, opt, STEPS - STEPS // 2, start=STEPS // 2, rank=rank, world=world)
    _save_params(model, out, rank)
    if rank == 0:
        (out / "params.pt").rename(out / "uninterrupted.pt")


def dcp_load_8bit(rank, world, out):
    """New processes load the checkpoint and finish the training: the uninterrupted run's params, bitwise. With
    another number of processes the load is refused (the blocks are another sharding's) and the state untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = _fsdp_8bit(fused=True)
    model_sd, optim_sd = get_state_dict(model, opt)  # the fake step creates the state
    before = {k: v.to_local().clone() for s in opt.state.values() for k, v in s.items() if k != "step"}
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(out / "ckpt"))
    except (Exception, CheckpointException) as exc:  # another world size (CheckpointException is a BaseException)
        after = {k: v.to_local() for s in opt.state.values() for k, v in s.items() if k != "step"}
        untouched = all(torch.equal(before[k], after[k]) for k in before)
        _save_params(model, out, rank, {"refused": f"{type(exc).__name__}: {exc}", "untouched": untouched})
        return
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    steps = sorted({int(s["step"]) for s in opt.state.values()})
    train_8bit(model, opt, STEPS - STEPS // 2, start=STEPS // 2, rank=rank, world=world)
    _save_params(model, out, rank, {"steps_after_load": steps, **_8bit_layout(model, opt)})


def fsdp2_8bit_conversions_and_refusals(rank, world, out):
    """On FSDP2's shards: an AdamNX state dict loads into AdamNX8bit (quantized shard by shard) and back (exact); what
    does not fit is refused with the optimizer untouched."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from adamnx import AdamNX, AdamNX8bit, quantized

    model, opt8 = _fsdp_8bit(fused=True)
    opt32 = AdamNX(model.parameters(), lr=LR)
    train_8bit(model, opt32, 3, rank=rank, world=world)
    weight = model[0].weight
    found: dict = {}
    opt8.load_state_dict(opt32.state_dict())  # float32 → 8-bit
    state = opt8.state[weight]
    m32 = opt32.state[weight]["exp_avg"].to_local()
    m8, v8 = (t.to_local() for t in quantized.moments_of(state))
    scale = state["exp_avg_absmax"].to_local()
    found["to_8bit"] = [type(state["exp_avg_codes"]).__name__, list(state["exp_avg_absmax"].shape)]
    found["within_one_code"] = bool(((m8 - m32).abs() <= 4 / 127 * scale.max() + 1e-12).all())
    back = AdamNX(model.parameters(), lr=LR)
    back.load_state_dict(opt8.state_dict())  # 8-bit → float32: the dequantized values, exactly
    found["back_exact"] = bool(torch.equal(back.state[weight]["exp_avg_sq"].to_local(), v8))
    found["back_type"] = type(back.state[weight]["exp_avg"]).__name__
    # refused, nothing changed: 8-bit state of an unsharded model (other blocks)
    before = {k: v.to_local().clone() for k, v in opt8.state[weight].items() if k != "step"}
    plain_model = make_8bit_model()
    plain = AdamNX8bit(plain_model.parameters(), lr=LR, min_8bit_size=256)
    train_8bit(plain_model, plain, 1)
    try:
        opt8.load_state_dict(plain.state_dict())
        found["plain_refused"] = None
    except ValueError as exc:
        found["plain_refused"] = str(exc)
    found["untouched"] = all(torch.equal(before[k], v.to_local()) for k, v in opt8.state[weight].items() if k != "step")
    # a DTensor sharded along dim 1 (tensor parallel's column shards): refused at construction
    column = torch.nn.Parameter(distribute_tensor(torch.randn(64, 64), weight.device_mesh, [Shard(1)]))
    try:
        AdamNX8bit([column], min_8bit_size=256)
        found["columns_refused"] = None
    except ValueError as exc:
        found["columns_refused"] = str(exc)
    _save_params(model, out, rank, found)


def fsdp2_float_state_placement_and_first_step(rank, world, out):
    """Float AdamNX on FSDP2: a plain (unsharded) state dict is refused by load_state_dict, untouched (it was accepted
    and the next step failed on mixed Tensor and DTensor); the route the message gives (set_optimizer_state_dict with
    full_state_dict=True) loads it. A real first step with lr = 0 counts on a rank whose shard has a zero gradient."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from adamnx import AdamNX

    found: dict = {}
    plain_model = make_model()
    plain = AdamNX(plain_model.parameters(), lr=LR, per_coordinate_steps=True)
    _train(plain_model, plain, 0, 1, 2, late=True)
    model, opt = _fsdp_model_and_opt(per_coordinate_steps=True, foreach=True)
    _train(model, opt, rank, world, 2, late=True)
    before = {k: _full(v).clone() for k, v in opt.state[model[0].weight].items()}
    try:
        opt.load_state_dict(plain.state_dict())
        found["plain_refused"] = None
    except ValueError as exc:
        found["plain_refused"] = str(exc)
    found["untouched"] = all(torch.equal(_full(v), before[k]) for k, v in opt.state[model[0].weight].items())
    full = get_optimizer_state_dict(plain_model, plain, options=StateDictOptions(full_state_dict=True))
    model, opt = _fsdp_model_and_opt(per_coordinate_steps=True, foreach=True)
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
    found["full_loaded"] = all(
        torch.equal(_full(opt.state[p][key]), plain.state[q][key])
        for p, q in zip(model.parameters(), plain_model.parameters())
        for key in ("exp_avg", "exp_avg_sq")
    ) and all(
        torch.equal(_full(opt.coord_steps(p)), plain.coord_steps(q))
        for p, q in zip(model.parameters(), plain_model.parameters())
    )
    # a warm-up from lr = 0: rank 1's shard of the first weight has a zero gradient in the first step
    model, opt = _fsdp_model_and_opt(lr=0.0)
    x, y = local_batch(0, rank, world)
    nn.functional.mse_loss(model(x), y).backward()
    if rank == 1:
        model[0].weight.grad.to_local().zero_()
    opt.step()
    steps = [None] * world
    dist.all_gather_object(steps, int(opt.state[model[0].weight]["step"]))
    found["first_steps"] = steps
    _save_params(model, out, rank, found)


def fsdp2_ranks_decide_alike(rank, world, out):
    """skip_nonfinite with an inf in one rank's shard: every rank skips (one rank skipped alone, and the shards of a
    param counted different steps; with lr = 0 at the first step the other rank then waited forever in the fake-step
    test's all-reduce). And bf16 stochastic rounding: two shards with the same values and gradients round apart."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    import adamnx.optimizer
    from adamnx import AdamNX

    found: dict = {}
    for name, lr in (("skipped", LR), ("skipped_first_at_lr_0", 0.0)):
        model, opt = _fsdp_model_and_opt(lr=lr, foreach=True, skip_nonfinite=True)
        if lr:
            calls: list[int] = []
            original = adamnx.optimizer.any_across

            def counted(*args, calls=calls, original=original):
                calls.append(1)
                return original(*args)

            adamnx.optimizer.any_across = counted
            _train(model, opt, rank, world, 2)
            adamnx.optimizer.any_across = original
            found["all_reduces_per_step"] = len(calls) / 2  # each layer has a mesh object of its own, all equal
        x, y = local_batch(5, rank, world)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if rank == 1:
            model[0].weight.grad.to_local()[0, 0] = float("inf")
        opt.step()
        steps = [None] * world
        state = opt.state.get(model[0].weight, {})
        dist.all_gather_object(steps, int(state["step"]) if "step" in state else None)
        found[name] = steps
    layer = nn.Linear(4096, 2, bias=False).bfloat16()
    with torch.no_grad():
        layer.weight.fill_(1.0 + 2.0**-10)
    fully_shard(layer)
    weight = layer.weight
    opt = AdamNX([weight], lr=2.0**-10, weight_decay=0.0, stochastic_rounding=True, state_dtype=torch.float32)
    weight.grad = distribute_tensor(-torch.ones(2, 4096, dtype=torch.bfloat16), weight.device_mesh, weight.placements)
    opt.step()
    local = weight.to_local().float()
    shards = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(shards, local)
    found["shards_round_apart"] = not torch.equal(shards[0], shards[1])
    _save_params(model, out, rank, found)


def ddp_own_seeds(rank, world, out):
    """Every rank seeds torch's generator its own way before each step (as for dropout): the stochastic roundings
    (8-bit codes; bf16 params with stochastic_rounding) still agree across the replicas, since they draw from a
    generator seeded by the step itself."""
    from torch.nn.parallel import DistributedDataParallel

    from adamnx import AdamNX, AdamNX8bit

    agree = {}
    for name, dtype, make in (
        ("8bit-fused", torch.float32, lambda ps: AdamNX8bit(ps, lr=LR, min_8bit_size=64, fused=True)),
        ("8bit-foreach", torch.float32, lambda ps: AdamNX8bit(ps, lr=LR, min_8bit_size=64, foreach=True)),
        ("bf16-sr", torch.bfloat16, lambda ps: AdamNX(ps, lr=LR, stochastic_rounding=True, foreach=True)),
    ):
        model = DistributedDataParallel(make_model().to(dtype))
        opt = make(model.parameters())
        for step in range(4):
            x, y = local_batch(step, rank, world)
            opt.zero_grad()
            nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
            torch.manual_seed(1000 * rank + step)  # each rank its own stream
            opt.step()
        tensors = [p.detach() for p in model.parameters()]
        tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        same = True
        for t in tensors:
            gathered = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(gathered, t.contiguous())
            same = same and all(torch.equal(g, gathered[0]) for g in gathered)
        agree[name] = same
    if rank == 0:
        (out / "extra.json").write_text(json.dumps(agree))


SCENARIOS = {
    f.__name__: f
    for f in (
        ddp,
        ddp_8bit,
        ddp_own_seeds,
        fsdp2_8bit_fused,
        fsdp2_8bit_foreach,
        fsdp2_8bit_guarded,
        dcp_save_8bit,
        dcp_load_8bit,
        dcp_save_guard,
        fsdp2_float_state_placement_and_first_step,
        fsdp2_ranks_decide_alike,
        dcp_load_guard,
        fsdp2_8bit_conversions_and_refusals,
        ddp_gradient_release,
        fsdp2,
        fsdp2_fused,
        fsdp2_guard,
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
