"""``adamnx bench``: every (optimizer, seed) of a task, resumable, then the report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import adamnx
from adamnx.bench.config import BenchConfig, ConfigError, from_dict, to_dict
from adamnx.bench.report import write_report
from adamnx.bench.runner import resolve_device, save_json, train_one, world
from adamnx.bench.tasks import get_task

__all__ = ["environment", "run_bench", "sweep"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce the numbers: versions, hardware, code version."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    env = {
        "adamnx": adamnx.__version__,
        "git commit": commit or "unknown",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cpu threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )


def init_distributed(device: str) -> None:
    """Join the data-parallel group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (the output folder may exist on rank 0's machine only)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_bench(
    cfg: BenchConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_evals: int | None = None,
) -> dict[str, Any] | None:
    """Run (or continue) every optimizer × seed of ``cfg``, then write the report in ``out_dir``.

    Under torchrun every process trains its share of each batch (DDP); rank 0 alone writes files and returns
    the summary (the others return None).
    """
    init_distributed(cfg.device)
    rank, world_size = world()
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world_size} processes")
    main = rank == 0
    progress = progress and main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "runs").mkdir(exist_ok=True)
    if resume:
        cfg = from_dict(_broadcast(json.loads((out_dir / "config.json").read_text()) if main else None))
    elif main:
        save_json(out_dir / "config.json", to_dict(cfg))
    env = {**environment(), "processes": world_size}
    if main:
        save_json(out_dir / "environment.json", env)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    task = get_task(cfg.task)
    splits = task.load(cfg)
    jobs = [(o, s) for o in cfg.run_names() for s in cfg.seeds]
    results = []
    with _progress(progress) as bar:
        overall = bar.add_task(f"{cfg.task}: runs", total=len(jobs)) if bar else None
        for optimizer, seed in jobs:
            result_path = out_dir / "runs" / f"{optimizer}-seed{seed}.json"
            if _broadcast(result_path.exists() if main else None):
                if main:
                    results.append(json.loads(result_path.read_text()))
                if bar:
                    bar.advance(overall)
                continue
            steps = bar.add_task(f"  {optimizer} seed {seed}", total=cfg.steps) if bar else None
            if optimizer.endswith("@jax"):
                from adamnx.bench.jax_runner import train_one_jax as trainer
            else:
                trainer = train_one
            result = trainer(
                cfg,
                task,
                splits,
                optimizer,
                seed,
                checkpoint=out_dir / "runs" / f"{optimizer}-seed{seed}.ckpt",
                on_step=(lambda s, task_id=steps: bar.update(task_id, completed=s)) if bar else None,
                stop_after_evals=stop_after_evals,
            )
            if main:
                save_json(result_path, result)
                (out_dir / "runs" / f"{optimizer}-seed{seed}.ckpt").unlink(missing_ok=True)
            results.append(result)
            if bar:
                bar.remove_task(steps)
                bar.advance(overall)

    if not main:
        return None
    with open(out_dir / "metrics.jsonl", "w") as fh:
        for r in results:
            for kind in ("logs", "evals"):
                for rec in r[kind]:
                    fh.write(
                        json.dumps({"optimizer": r["optimizer"], "seed": r["seed"], "kind": kind[:-1], **rec}) + "\n"
                    )
    save_json(out_dir / "results.json", [{k: v for k, v in r.items() if k not in ("logs", "evals")} for r in results])
    summary = write_report(out_dir, cfg, task, results, env)
    save_json(out_dir / "summary.json", summary)
    return summary


def default_out_dir(task: str, root: str = "runs") -> Path:
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{task}"


def sweep(cfg: BenchConfig, out_dir: Path, progress: bool = True) -> dict[str, float]:
    """The documented lr sweep: each optimizer at each of ``cfg.sweep_lrs``, first seed, best validation metric."""
    task = get_task(cfg.task)
    splits = task.load(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for optimizer in cfg.optimizers:
        table[optimizer] = {}
        for lr in cfg.sweep_lrs:
            cfg.lr = {**cfg.lr, optimizer: lr}
            result = train_one(cfg, task, splits, optimizer, cfg.seeds[0])
            table[optimizer][f"{lr:g}"] = result["best_val_metric"]
        sign = 1.0 if task.higher_is_better else -1.0
        scores = {k: sign * v if v == v else -float("inf") for k, v in table[optimizer].items()}  # NaN: diverged
        chosen[optimizer] = float(max(scores, key=scores.get))
    save_json(out_dir / "sweep.json", {"validation_metric": table, "chosen_lr": chosen})
    return chosen
