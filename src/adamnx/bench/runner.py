"""One run of the harness, either framework: (task, optimizer, seed, framework), resumable from its last evaluation.

This is the only training loop. It owns everything that does not depend on the framework — the data order
(``batches``), the evaluation schedule, checkpoint selection on validation, checkpoints and resume, the run's
record — and asks a trainer (``TorchTrainer`` or ``JaxTrainer``) for the model and step code.

Determinism: batch order comes from (seed, epoch), augmentation from (seed, step), and the trainer's state (for
torch including the global RNG, used by stochastic depth) is saved in each checkpoint, so a resumed run replays
exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from adamnx.bench.batches import BatchOrder
from adamnx.bench.stats import mean_std
from adamnx.bench.tasks import Splits, Task
from adamnx.bench.torch_trainer import TorchTrainer, world

__all__ = ["BenchInterrupted", "Trainer", "make_trainer", "save_json", "train_one"]


class BenchInterrupted(RuntimeError):
    """Raised (for tests) after a checkpoint when a run is told to stop early; ``--resume`` continues it."""


class Trainer(Protocol):
    """The framework's part of a run: what ``train_one`` needs from a model and its optimizer."""

    lr: float
    constructor: str  # the exact optimizer call, for the report

    def train_step(self, idx: torch.Tensor, step: int, measure: bool) -> tuple[float, dict[str, float] | None]: ...
    def evaluate(self, split: str) -> tuple[float, float]: ...
    def hessian(self, iters: int, samples: int) -> float: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_trainer(cfg: Any, task: Task, splits: Splits, optimizer: str, seed: int, framework: str) -> Trainer:
    if framework == "jax":
        from adamnx.bench.jax_trainer import JaxTrainer

        return JaxTrainer(cfg, task, splits, optimizer, seed)
    return TorchTrainer(cfg, task, splits, optimizer, seed)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint holds besides the trainer's state."""

    step: int = 0
    evals: list[dict] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    best: dict | None = None
    diverged: bool = False


def _better(task: Task, candidate: dict, best: dict | None) -> bool:
    if best is None:
        return True
    a, b = candidate["val_metric"], best["val_metric"]
    if a == b:
        return candidate["val_loss"] < best["val_loss"]
    return a > b if task.higher_is_better else a < b


def _evaluate(trainer: Trainer, task: Task, progress: Progress, step: int, train_loss: float) -> None:
    """Evaluate on validation and test; keep the checkpoint that is best on validation."""
    (val_loss, val_metric), (test_loss, test_metric) = trainer.evaluate("val"), trainer.evaluate("test")
    entry = {
        "step": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_metric": val_metric,
        "test_loss": test_loss,
        "test_metric": test_metric,
    }
    progress.evals.append(entry)
    if _better(task, entry, progress.best):
        progress.best = entry


def _save_checkpoint(path: Path, trainer: Trainer, progress: Progress) -> None:
    state = {
        "trainer": trainer.state_dict(),
        "step": progress.step,
        "evals": progress.evals,
        "logs": progress.logs,
        "best": progress.best or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint


def _load_checkpoint(path: Path | None, trainer: Trainer) -> Progress:
    """Rank 0's checkpoint of this run, on every rank: rank 0 alone writes the run folder, which across machines
    exists on its machine only, and every rank must continue from the same step."""
    rank, world_size = world()
    saved = None
    if path is not None and rank == 0 and path.exists():
        saved = torch.load(path, weights_only=True)
    if world_size > 1:
        box = [saved]
        torch.distributed.broadcast_object_list(box, src=0)
        saved = box[0]
    if saved is None:
        return Progress()
    trainer.load_state_dict(saved["trainer"])
    return Progress(saved["step"], saved["evals"], saved["logs"], saved["best"] or None)


def train_one(
    cfg: Any,
    task: Task,
    splits: Splits,
    optimizer: str,
    seed: int,
    framework: str = "torch",
    checkpoint: Path | None = None,
    on_step: Callable[[int], None] | None = None,
    stop_after_evals: int | None = None,
) -> dict[str, Any]:
    """Train one model; return its record (selection on validation, test reported at the selected step).

    With ``checkpoint``, the run continues from that file when it exists and saves it at every evaluation;
    ``stop_after_evals`` raises :class:`BenchInterrupted` after that many evaluations (what a kill does).
    """
    trainer = make_trainer(cfg, task, splits, optimizer, seed, framework)
    progress = _load_checkpoint(checkpoint, trainer)
    rank = world()[0]
    order = BatchOrder(seed, len(splits.x_train), cfg.batch_size)
    started = time.perf_counter()
    evals_this_session = 0
    for step in range(progress.step, cfg.steps):
        measure = (step + 1) % cfg.log_every == 0
        loss, record = trainer.train_step(order.indices(step), step, measure)
        if record is not None:
            progress.logs.append({"step": step + 1, "train_loss": loss, **record})
        if not math.isfinite(loss):
            progress.diverged = True
            break
        if on_step is not None:
            on_step(step + 1)
        if (step + 1) % cfg.eval_every and step + 1 != cfg.steps:
            continue
        _evaluate(trainer, task, progress, step + 1, loss)
        if checkpoint is None or step + 1 == cfg.steps:
            continue
        progress.step = step + 1
        if rank == 0:
            _save_checkpoint(checkpoint, trainer, progress)
        evals_this_session += 1
        if stop_after_evals is not None and evals_this_session >= stop_after_evals:
            raise BenchInterrupted(f"stopped after {evals_this_session} evaluations (checkpoint saved)")

    hessian = float("nan")
    if cfg.hessian_iters > 0 and not progress.diverged and rank == 0:
        hessian = trainer.hessian(cfg.hessian_iters, cfg.hessian_samples)
    identity = {"task": task.name, "optimizer": optimizer, "framework": framework, "seed": seed}
    return run_record(identity, trainer, progress, hessian, time.perf_counter() - started)


def _last_fraction(values: list[float], fraction: float = 0.2) -> list[float]:
    k = max(2, math.ceil(len(values) * fraction))
    return values[-k:]


def run_record(identity: dict, trainer: Trainer, progress: Progress, hessian: float, seconds: float) -> dict:
    """One run's record: selection on validation, test at the selected step, late-training stability."""
    best, evals, logs = progress.best, progress.evals, progress.logs
    val_losses = [e["val_loss"] for e in evals]
    last_updates = _last_fraction([r["update_norm"] for r in logs]) if logs else []
    mean_update, std_update = mean_std(last_updates) if last_updates else (float("nan"), float("nan"))
    final = evals[-1] if evals else {}
    return {
        **identity,
        "lr": trainer.lr,
        "constructor": trainer.constructor,
        "diverged": progress.diverged,
        "best_step": best["step"] if best else None,
        "best_val_metric": best["val_metric"] if best else float("nan"),
        "test_at_best_val": best["test_metric"] if best else float("nan"),
        "final_val_loss": final.get("val_loss", float("nan")),
        "final_test_metric": final.get("test_metric", float("nan")),
        "val_loss_std_last20": mean_std(_last_fraction(val_losses))[1] if len(val_losses) >= 2 else float("nan"),
        "update_norm_cv_last20": std_update / mean_update if last_updates and mean_update > 0 else float("nan"),
        "hessian_top_eigenvalue": hessian,
        "wall_time_s": seconds,
        "evals": evals,
        "logs": logs,
    }


def save_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
