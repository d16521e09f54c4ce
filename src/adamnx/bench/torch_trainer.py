"""The torch side of a run: model, optimizer, schedule, one training step, evaluation, Hessian, state.

The loop around it (data order, evaluation schedule, selection, checkpoints, records) is ``runner.train_one``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from adamnx.bench.batches import augment_generator
from adamnx.bench.hessian import top_hessian_eigenvalue
from adamnx.bench.optimizers import build_optimizer, optimizer_spec, second_moment_tensors
from adamnx.bench.tasks import Splits, Task, normalize_cifar, paper_lr_lambda

__all__ = ["TorchTrainer", "resolve_device", "world"]


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


def _eval_inputs(task: Task, x: Tensor) -> Tensor:
    return normalize_cifar(x) if task.name.startswith("cifar") else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, x: Tensor, y: Tensor, device, chunk: int = 1000):
    model.eval()
    loss_sum, metric_sum = 0.0, 0.0
    for i in range(0, len(x), chunk):
        xb, yb = _eval_inputs(task, x[i : i + chunk]).to(device), y[i : i + chunk].to(device)
        out = model(xb)
        loss_sum += task.loss(out, yb).item() * len(xb)
        metric_sum += task.metric(out, yb) * len(xb)
    model.train()
    return loss_sum / len(x), metric_sum / len(x)


class TorchTrainer:
    """One torch model and optimizer (DDP under torchrun: each process trains its share of each batch)."""

    def __init__(self, cfg: Any, task: Task, splits: Splits, optimizer: str, seed: int) -> None:
        self.task, self.splits, self.seed = task, splits, seed
        self.device = resolve_device(cfg.device)
        self.rank, self.world_size = world()
        torch.manual_seed(seed)
        self.model = task.model(cfg).to(self.device)
        self.net = self.model  # what trains; `model` itself evaluates (no collectives outside training steps)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.lr = cfg.lr_for(optimizer)
        wd = None if cfg.weight_decay < 0 else cfg.weight_decay  # < 0: each optimizer's own default
        group_wd = wd if wd is not None else optimizer_spec(optimizer).kwargs.get("weight_decay", 0.0)
        self.opt = build_optimizer(optimizer, task.param_groups(self.model, group_wd), self.lr, wd)
        schedule = paper_lr_lambda(cfg.steps) if cfg.schedule == "paper" else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.constructor = optimizer_spec(optimizer).constructor

    def _batch(self, idx: Tensor, step: int) -> tuple[Tensor, Tensor]:
        x = self.task.augment(self.splits.x_train[idx], augment_generator(self.seed, step))
        x, y = x.to(self.device), self.splits.y_train[idx].to(self.device)
        if self.world_size > 1:  # this rank's equal share of the global batch; DDP averages the gradients
            share = len(idx) // self.world_size
            x, y = x[self.rank * share : (self.rank + 1) * share], y[self.rank * share : (self.rank + 1) * share]
        return x, y

    def train_step(self, idx: Tensor, step: int, measure: bool) -> tuple[float, dict[str, float] | None]:
        """One step on the examples ``idx``: (the batch loss, with ``measure`` the lr, update norm and ‖Δv‖/‖v‖)."""
        x, y = self._batch(idx, step)
        loss = self.task.loss(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if measure:
            before = [p.detach().clone() for p in self.params]
            v_before = [v.clone() for v in second_moment_tensors(self.opt)]
        self.opt.step()
        self.scheduler.step()
        if not measure:
            return loss.item(), None
        record = {"lr": self.scheduler.get_last_lr()[0]}
        record["update_norm"] = math.sqrt(
            sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(self.params, before))
        )
        v_after = second_moment_tensors(self.opt)
        if v_before and len(v_before) == len(v_after):
            dv = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(v_after, v_before)))
            v_norm = math.sqrt(sum((a**2).sum().item() for a in v_after))
            record["dv_rel"] = dv / v_norm if v_norm > 0 else float("nan")
        return loss.item(), record

    def evaluate(self, split: str) -> tuple[float, float]:
        x, y = getattr(self.splits, f"x_{split}"), getattr(self.splits, f"y_{split}")
        return evaluate(self.model, self.task, x, y, self.device)

    def hessian(self, iters: int, samples: int) -> float:
        n = min(samples, len(self.splits.x_train))
        xh = _eval_inputs(self.task, self.splits.x_train[:n]).to(self.device)
        yh = self.splits.y_train[:n].to(self.device)
        self.model.eval()
        top = top_hessian_eigenvalue(lambda: self.task.loss(self.model(xh), yh), self.params, iters=iters)
        self.model.train()
        return top

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),  # stochastic depth draws from the global RNG
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
