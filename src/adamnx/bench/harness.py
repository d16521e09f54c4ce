"""``adamnx bench``: every (optimizer, framework, seed) of a task, resumable, then the report.

A run folder holds ``config.json`` from the start; everything that can fail before training (the device, the
data) is checked before the folder is made, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adamnx.bench import registry
from adamnx.bench.config import BenchConfig, ConfigError, recorded_sweep, to_dict
from adamnx.bench.environment import environment
from adamnx.bench.registry import display_name, run_key
from adamnx.bench.report import write_report
from adamnx.bench.runner import save_json, train_one
from adamnx.bench.tasks import Splits, Task, get_task
from adamnx.bench.torch_trainer import resolve_device, world

__all__ = ["claim_folder", "default_out_dir", "prepare", "run_bench", "start_bench", "sweep"]


@dataclass
class Prepared:
    task: Task
    splits: Splits


def prepare(cfg: BenchConfig) -> Prepared:
    """Threads, device and data of ``cfg``: what can fail before training, checked without writing anything."""
    if cfg.threads > 0:  # before torch's first parallel op: the small tasks run best on one (benchmarks/threads.py)
        torch.set_num_threads(cfg.threads)
    try:
        resolve_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    task = get_task(cfg.task)
    return Prepared(task, task.load(cfg))


def _refuse_taken(folder: Path, cfg: BenchConfig | None) -> None:
    """Refuse a folder that already holds a run (never mix two runs) or anything else."""
    for marker in ("config.json", "bench.json"):
        if (folder / marker).exists():
            same = cfg is not None and marker == "config.json"
            same = same and json.loads((folder / marker).read_text()) == to_dict(cfg)
            what = "this run" if same else "a run" if cfg is None else "a run of another config"
            raise ConfigError(
                f"{folder} already holds {what}: continue it with `adamnx bench --resume {folder}`, "
                "or choose another --out"
            )
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"{folder} is not empty and holds no bench run: choose another --out")


def claim_folder(out_dir: Path, cfg: BenchConfig) -> None:
    """Make ``out_dir`` a run folder of ``cfg`` (``config.json`` first); refuse one that is taken."""
    _refuse_taken(out_dir, cfg)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "config.json", to_dict(cfg))


def start_bench(configs: list[BenchConfig], folders: list[Path], root: Path | None = None) -> list[Prepared]:
    """Check every task (device, data) and folder, then claim the folders: all before the first step.

    A multi-task run's ``root`` gets ``bench.json`` naming its tasks (one folder each), which ``--resume`` reads.
    Under torchrun rank 0 claims; every rank gets its verdict.
    """
    prepared = [prepare(cfg) for cfg in configs]
    init_distributed(configs[0].device)
    error = None
    if world()[0] == 0:
        try:
            if root is not None:
                _refuse_taken(root, None)
            for cfg, folder in zip(configs, folders):
                _refuse_taken(folder, cfg)
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
                save_json(root / "bench.json", {"tasks": [cfg.task for cfg in configs]})
            for cfg, folder in zip(configs, folders):
                claim_folder(folder, cfg)
        except ConfigError as exc:
            error = str(exc)
    error = _broadcast(error)
    if error:
        raise ConfigError(error)
    return prepared


class _Lines:
    """One line per finished run on stdout (a log, a pipe, CI): never a silent stretch."""

    def __init__(self, title: str, total: int) -> None:
        self.title, self.total, self.done, self.started = title, total, 0, time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, label: str, steps: int) -> Callable[[int], None] | None:
        return None

    def finished(self, label: str, seconds: float | None, note: str = "") -> None:
        self.done += 1
        took = "recorded earlier" if seconds is None else f"{seconds:.1f} s"
        elapsed = time.perf_counter() - self.started
        print(f"{self.title}: [{self.done}/{self.total}] {label} ({took}{note}; {elapsed:.0f} s so far)", flush=True)


class _Silent(_Lines):
    def finished(self, label: str, seconds: float | None, note: str = "") -> None:
        pass


class _Bars(_Lines):
    """rich progress bars on a terminal: the runs, and the steps of the current run."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar = Progress(*columns, transient=True)
        self.bar.__enter__()
        self.overall = self.bar.add_task(f"{self.title}: runs", total=self.total)
        self.current = None
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def run(self, label: str, steps: int) -> Callable[[int], None]:
        self.current = self.bar.add_task(f"  {label}", total=steps)
        return lambda s, task_id=self.current: self.bar.update(task_id, completed=s)

    def finished(self, label: str, seconds: float | None, note: str = "") -> None:
        if self.current is not None:
            self.bar.remove_task(self.current)
            self.current = None
        self.bar.advance(self.overall)


def reporter(progress: bool | str, title: str, total: int) -> _Lines:
    """``progress``: "bars", "lines", "none", or "auto"/True (bars on a terminal, else lines); False: none."""
    if progress is True or progress == "auto":
        progress = "bars" if sys.stdout.isatty() else "lines"
    if progress == "bars":
        return _Bars(title, total)
    return _Lines(title, total) if progress == "lines" else _Silent(title, total)


def init_distributed(device: str) -> None:
    """Join the data-parallel group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            # One GPU per process: NCCL's object collectives (the broadcasts below) run on the current device, and
            # left at cuda:0 on every process of a node they would put several ranks on one GPU.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (the output folder may exist on rank 0's machine only)."""
    if world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _note(task: Task, result: dict) -> str:
    if result["diverged"]:
        return ", diverged"
    return ", " + registry.format_metric(task.metric_name, result["test_at_best_val"])


def _train_all(
    cfg: BenchConfig, prepared: Prepared, out_dir: Path, progress: bool | str, stop_after_evals: int | None
) -> list[dict]:
    """Every (optimizer, framework, seed) not yet recorded in ``out_dir/runs``; the records of all of them."""
    main = world()[0] == 0
    frameworks = len(cfg.frameworks())
    jobs = [(o, f, s) for o, f in cfg.runs() for s in cfg.seeds]
    results = []
    with reporter(progress if main else False, cfg.task, len(jobs)) as shown:
        for optimizer, framework, seed in jobs:
            stem = out_dir / "runs" / f"{run_key(optimizer, framework)}-seed{seed}"
            label = f"{display_name(optimizer, framework, frameworks)} seed {seed}"
            if _broadcast(stem.with_suffix(".json").exists() if main else None):
                if main:
                    results.append(json.loads(stem.with_suffix(".json").read_text()))
                shown.finished(label, None)
                continue
            result = train_one(
                cfg,
                prepared.task,
                prepared.splits,
                optimizer,
                seed,
                framework,
                checkpoint=stem.with_suffix(".ckpt"),
                on_step=shown.run(label, cfg.steps),
                stop_after_evals=stop_after_evals,
            )
            if main:
                save_json(stem.with_suffix(".json"), result)
                stem.with_suffix(".ckpt").unlink(missing_ok=True)
            results.append(result)
            shown.finished(label, result["wall_time_s"], _note(prepared.task, result))
    return results


def _write_outputs(out_dir: Path, cfg: BenchConfig, task: Task, results: list[dict], env: dict) -> dict:
    with open(out_dir / "metrics.jsonl", "w") as fh:
        for r in results:
            for kind in ("logs", "evals"):
                for rec in r[kind]:
                    row = {"optimizer": r["optimizer"], "framework": r["framework"], "seed": r["seed"]}
                    fh.write(json.dumps({**row, "kind": kind[:-1], **rec}) + "\n")
    records = [{k: v for k, v in r.items() if k not in ("logs", "evals")} for r in results]
    save_json(out_dir / "results.json", records)
    summary = write_report(out_dir, cfg, task, results, env)
    save_json(out_dir / "summary.json", summary)
    return summary


def run_bench(
    cfg: BenchConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool | str = True,
    stop_after_evals: int | None = None,
    prepared: Prepared | None = None,
) -> dict[str, Any] | None:
    """Run every run of ``cfg`` in a new folder ``out_dir`` (or, with ``resume``, continue the run there), then report.

    Under torchrun every process trains its share of each batch (DDP); rank 0 alone writes files and returns
    the summary (the others return None).
    """
    prepared = prepared or prepare(cfg)  # before any folder is made
    init_distributed(cfg.device)
    rank, world_size = world()
    main = rank == 0
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world_size} processes")
    if main and resume and json.loads((out_dir / "config.json").read_text()) != to_dict(cfg):
        raise ConfigError(f"{out_dir}/config.json is not this config: resume with `adamnx bench --resume {out_dir}`")
    if main and not resume:
        claim_folder(out_dir, cfg)
    env = {**environment(), "processes": world_size}
    if main:
        save_json(out_dir / "environment.json", env)
    results = _train_all(cfg, prepared, out_dir, progress, stop_after_evals)
    return _write_outputs(out_dir, cfg, prepared.task, results, env) if main else None


def default_out_dir(task: str | None, root: str = "runs") -> Path:
    """runs/<timestamp>-<task> for one task, runs/<timestamp> for a multi-task run (one folder per task in it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / (f"{stamp}-{task}" if task else stamp)


def choose_lr(scores: dict[str, float], higher_is_better: bool) -> float:
    """The sweep's pick: the best validation metric (NaN: diverged, never picked); ties go to the smaller lr."""
    sign = 1.0 if higher_is_better else -1.0
    ranked = {k: sign * v if v == v else -float("inf") for k, v in scores.items()}
    return float(max(sorted(ranked, key=float), key=ranked.get))


def sweep(cfg: BenchConfig, out_dir: Path, progress: bool | str = True) -> dict[str, Any]:
    """The documented lr sweep: each optimizer at each of ``cfg.sweep_lrs``, first seed, best validation metric.

    Writes ``out_dir/sweep.json`` in the format of the shipped ``src/adamnx/bench/sweeps/TASK.json``, which the
    task's config reads its learning rates from.
    """
    prepared = prepare(cfg)
    if (out_dir / "sweep.json").exists():
        raise ConfigError(f"{out_dir} already holds a sweep: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    base = cfg.lr
    with reporter(progress, f"{cfg.task} sweep", len(cfg.optimizers) * len(cfg.sweep_lrs)) as shown:
        for optimizer in cfg.optimizers:
            table[optimizer] = {}
            for lr in cfg.sweep_lrs:
                cfg.lr = {**base, optimizer: lr}
                label = f"{display_name(optimizer)} lr {lr:g}"
                result = train_one(
                    cfg, prepared.task, prepared.splits, optimizer, cfg.seeds[0], on_step=shown.run(label, cfg.steps)
                )
                table[optimizer][f"{lr:g}"] = result["best_val_metric"]
                shown.finished(label, result["wall_time_s"], f", validation {result['best_val_metric']:.4g}")
            chosen[optimizer] = choose_lr(table[optimizer], prepared.task.higher_is_better)
    cfg.lr = base
    record = {
        "task": cfg.task,
        "grid": [f"{lr:g}" for lr in cfg.sweep_lrs],
        "seed": cfg.seeds[0],
        "steps": cfg.steps,
        "environment": environment(),
        "validation_metric": table,
        "chosen_lr": chosen,
    }
    save_json(out_dir / "sweep.json", record)
    shipped = recorded_sweep(cfg.task)
    record["shipped_lr"] = shipped["chosen_lr"] if shipped else None
    return record
