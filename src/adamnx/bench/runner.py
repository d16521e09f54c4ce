"""Training runs for the harness: one (task, optimizer, seed) at a time, resumable from its last evaluation.

Determinism: batch order comes from a generator seeded by (seed, epoch), augmentation from (seed, step), and
the global RNG (used by stochastic depth) is saved in each checkpoint, so a resumed run replays exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adamnx.bench.config import BenchConfig
from adamnx.bench.hessian import top_hessian_eigenvalue
from adamnx.bench.optimizers import OPTIMIZERS, build_optimizer, second_moment_tensors
from adamnx.bench.tasks import Splits, Task, normalize_cifar, paper_lr_lambda

__all__ = ["BenchInterrupted", "resolve_device", "train_one"]


class BenchInterrupted(RuntimeError):
    """Raised (for tests) after a checkpoint when a run is told to stop early; ``--resume`` continues it."""


def world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process under torchrun
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _eval_inputs(task: Task, x: torch.Tensor) -> torch.Tensor:
    return normalize_cifar(x) if task.name.startswith("cifar") else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, device, chunk: int = 1000):
    model.eval()
    loss_sum, metric_sum = 0.0, 0.0
    for i in range(0, len(x), chunk):
        xb, yb = _eval_inputs(task, x[i : i + chunk]).to(device), y[i : i + chunk].to(device)
        out = model(xb)
        loss_sum += task.loss(out, yb).item() * len(xb)
        metric_sum += task.metric(out, yb) * len(xb)
    model.train()
    return loss_sum / len(x), metric_sum / len(x)


def _better(task: Task, candidate: dict, best: dict | None) -> bool:
    if best is None:
        return True
    a, b = candidate["val_metric"], best["val_metric"]
    if a == b:
        return candidate["val_loss"] < best["val_loss"]
    return a > b if task.higher_is_better else a < b


def _last_fraction(values: list[float], fraction: float = 0.2) -> list[float]:
    k = max(2, math.ceil(len(values) * fraction))
    return values[-k:]


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _rank0_checkpoint(checkpoint: Path | None, rank: int, world_size: int) -> dict[str, Any] | None:
    """Rank 0's checkpoint of this run (None if it has none) on every rank: rank 0 alone writes the run folder,
    which may exist on its machine only (across nodes), and every rank must resume from the same step."""
    if checkpoint is None:
        return None
    saved = torch.load(checkpoint, weights_only=True) if rank == 0 and checkpoint.exists() else None
    if world_size > 1:
        box = [saved]
        torch.distributed.broadcast_object_list(box, src=0)
        saved = box[0]
    return saved


def train_one(
    cfg: BenchConfig,
    task: Task,
    splits: Splits,
    optimizer: str,
    seed: int,
    checkpoint: Path | None = None,
    on_step: Callable[[int], None] | None = None,
    stop_after_evals: int | None = None,
) -> dict[str, Any]:
    """Train one model; return its result (selection on validation, test reported at the selected step)."""
    device = resolve_device(cfg.device)
    rank, world_size = world()
    torch.manual_seed(seed)
    model = task.model(cfg).to(device)
    net = model  # what trains; `model` itself evaluates (no collectives outside training steps)
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    lr = cfg.lr_for(optimizer)
    wd = None if cfg.weight_decay < 0 else cfg.weight_decay  # < 0: each optimizer's own default
    group_wd = wd if wd is not None else OPTIMIZERS[optimizer].kwargs.get("weight_decay", 0.0)
    opt = build_optimizer(optimizer, task.param_groups(model, group_wd), lr, wd)
    schedule = paper_lr_lambda(cfg.steps) if cfg.schedule == "paper" else (lambda step: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    params = [p for p in model.parameters() if p.requires_grad]

    start, evals, logs, best = 0, [], [], None
    saved = _rank0_checkpoint(checkpoint, rank, world_size)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        start, evals, logs, best = saved["step"], saved["evals"], saved["logs"], saved["best"]
        best = best or None

    steps_per_epoch = max(1, len(splits.x_train) // cfg.batch_size)  # drop_last, as the authors do
    perm_epoch, perm = -1, None
    started = time.perf_counter()
    diverged = False
    evals_this_session = 0
    for step in range(start, cfg.steps):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            perm_epoch = epoch
        idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        x = task.augment(splits.x_train[idx], torch.Generator().manual_seed(seed * 1_000_003 + step))
        x, y = x.to(device), splits.y_train[idx].to(device)
        if world_size > 1:  # this rank's equal share of the global batch; DDP averages the gradients
            share = len(idx) // world_size
            x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        loss = task.loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()

        measure = (step + 1) % cfg.log_every == 0
        if measure:
            before = [p.detach().clone() for p in params]
            v_before = [v.clone() for v in second_moment_tensors(opt)]
        opt.step()
        scheduler.step()
        if measure:
            record = {"step": step + 1, "train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
            record["update_norm"] = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(params, before)))
            v_after = second_moment_tensors(opt)
            if v_before and len(v_before) == len(v_after):
                dv = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(v_after, v_before)))
                v_norm = math.sqrt(sum((a**2).sum().item() for a in v_after))
                record["dv_rel"] = dv / v_norm if v_norm > 0 else float("nan")
            logs.append(record)
        if not math.isfinite(loss.item()):
            diverged = True
            break
        if on_step is not None:
            on_step(step + 1)

        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val_loss, val_metric = evaluate(model, task, splits.x_val, splits.y_val, device)
            test_loss, test_metric = evaluate(model, task, splits.x_test, splits.y_test, device)
            entry = {
                "step": step + 1,
                "train_loss": loss.item(),
                "val_loss": val_loss,
                "val_metric": val_metric,
                "test_loss": test_loss,
                "test_metric": test_metric,
            }
            evals.append(entry)
            if _better(task, entry, best):
                best = entry
            if checkpoint is not None and step + 1 < cfg.steps and rank == 0:
                tmp = checkpoint.with_suffix(".tmp")
                state = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step + 1,
                    "evals": evals,
                    "logs": logs,
                    "best": best or {},
                }
                torch.save(state, tmp)
                os.replace(tmp, checkpoint)  # atomic: a kill never leaves half a checkpoint
            if checkpoint is not None and step + 1 < cfg.steps:
                evals_this_session += 1
                if stop_after_evals is not None and evals_this_session >= stop_after_evals:
                    raise BenchInterrupted(f"stopped after {evals_this_session} evaluations (checkpoint saved)")

    hessian = float("nan")
    if cfg.hessian_iters > 0 and not diverged and rank == 0:
        n = min(cfg.hessian_samples, len(splits.x_train))
        xh, yh = _eval_inputs(task, splits.x_train[:n]).to(device), splits.y_train[:n].to(device)
        model.eval()
        hessian = top_hessian_eigenvalue(lambda: task.loss(model(xh), yh), params, iters=cfg.hessian_iters)
        model.train()

    return run_result(
        task, optimizer, seed, lr, OPTIMIZERS[optimizer].constructor, diverged, best, evals, logs, hessian, started
    )


def run_result(
    task: Task,
    optimizer: str,
    seed: int,
    lr: float,
    constructor: str,
    diverged: bool,
    best: dict | None,
    evals: list[dict],
    logs: list[dict],
    hessian: float,
    started: float,
) -> dict[str, Any]:
    """One run's record (both frameworks): selection on validation, test at the selected step, stability."""
    val_losses = [e["val_loss"] for e in evals]
    last_updates = _last_fraction([r["update_norm"] for r in logs]) if logs else []
    mean_update = sum(last_updates) / len(last_updates) if last_updates else float("nan")
    final = evals[-1] if evals else {}
    return {
        "task": task.name,
        "optimizer": optimizer,
        "seed": seed,
        "lr": lr,
        "constructor": constructor,
        "diverged": diverged,
        "best_step": best["step"] if best else None,
        "best_val_metric": best["val_metric"] if best else float("nan"),
        "test_at_best_val": best["test_metric"] if best else float("nan"),
        "final_val_loss": final.get("val_loss", float("nan")),
        "final_test_metric": final.get("test_metric", float("nan")),
        "val_loss_std_last20": _std(_last_fraction(val_losses)) if len(val_losses) >= 2 else float("nan"),
        "update_norm_cv_last20": _std(last_updates) / mean_update if last_updates and mean_update > 0 else float("nan"),
        "hessian_top_eigenvalue": hessian,
        "wall_time_s": time.perf_counter() - started,
        "evals": evals,
        "logs": logs,
    }


def save_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
