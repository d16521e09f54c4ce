"""The ``adamnx`` command: ``bench`` (the harness), ``schedule`` (the coefficients) and ``perf`` (step speed)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adamnx.bench.arguments import perf_arguments, stress_arguments
from adamnx.bench.registry import DEFAULT_TASKS, TASK_DESCRIPTIONS


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one its help does not already give), and the epilogs keep
    their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _tasks_epilog() -> str:
    width = max(map(len, TASK_DESCRIPTIONS))
    lines = [f"  {name:<{width}}  {text}" for name, text in TASK_DESCRIPTIONS.items()]
    return "tasks (--task; default: " + " ".join(DEFAULT_TASKS) + "):\n" + "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The command line, built without importing torch: ``adamnx --help`` answers at once."""
    parser = argparse.ArgumentParser(prog="adamnx", description="AdamNX: benchmark harness and tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="compare AdamNX with its rivals on offline tasks (the default run takes ≤ 5 minutes on 2 CPU cores)",
        description="Train every optimizer × seed on each task, select on validation, report on test, and write "
        "runs/<timestamp>-<task>/ with report.md, plots and raw metrics.",
        epilog=_tasks_epilog(),
        formatter_class=_Formatter,
    )
    bench.add_argument(
        "--task", action="append", help="task to run (repeatable; listed below); default: " + " ".join(DEFAULT_TASKS)
    )
    bench.add_argument("--quick", action="store_true", help="a < 60 s smoke run (fewer steps and seeds)")
    bench.add_argument(
        "--ablation", action="store_true", help="swap only the β̂2 rule: Adam, AdaX, AdamNX, 1/t, Adafactor"
    )
    bench.add_argument(
        "--sweep", action="store_true", help="run the documented lr sweep instead and print the chosen lrs"
    )
    bench.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (type-checked), e.g. --set steps=500 --set lr.adamnx=1e-3",
    )
    bench.add_argument(
        "--study",
        choices=["horizon"],
        help="horizon: AdamNX vs AdamW at the same β2 for T/H = 0.3, 1, 3, 10 (mnist1d unless --task; "
        "with --sweep, its lr sweep, written to --sweep-file)",
    )
    bench.add_argument(
        "--sweep-file",
        help="the horizon study's recorded lr sweep (default src/adamnx/bench/sweeps/horizon-<task>.json)",
    )
    bench.add_argument("--data-dir", help="folder with CIFAR's python pickle files (cifar10/cifar100 tasks)")
    bench.add_argument(
        "--framework",
        choices=["torch", "jax", "both"],
        help="torch (default), the optax twins (jax), or both side by side; jax/both: mnist1d",
    )
    bench.add_argument("--out", help="output folder (default runs/<timestamp>-<task>)")
    bench.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed bench (one task's folder, or a multi-task run's folder) with its recorded config",
    )
    bench.add_argument(
        "--no-progress", action="store_true", help="no progress bars: one line per finished run (as when piped)"
    )
    bench.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine (DDP: gloo on CPU, NCCL on GPUs); under torchrun, omit it",
    )

    schedule = sub.add_parser(
        "schedule",
        help="print 1 − β̂2_t and the horizon for given β2",
        description="AdamNX's second-moment weight 1 − β̂2_t = c^(t−1)(1−c)/(1−c^t), c = β2^(1−β2), and its horizon.",
        formatter_class=_Formatter,
    )
    schedule.add_argument("--beta2", type=float, action="append", help="β2 (repeatable; default 0.9 0.99 0.999)")
    schedule.add_argument("--horizon", type=float, help="print the β2 whose horizon is this many steps")
    schedule.add_argument("--steps", default="1,10,100,1000,10000,100000,1000000", help="comma-separated steps")

    perf = sub.add_parser(
        "perf",
        help="step-speed benchmark: AdamNX vs torch AdamW (for-loop, foreach, fused)",
        description="Time the optimizer step alone; writes JSON, a markdown table and a PNG.",
        formatter_class=_Formatter,
    )
    perf_arguments(perf)

    stress = sub.add_parser(
        "stress",
        help="the late-activation stress test: update size of coordinates whose first gradient comes late",
        description="Embedding rows that first get a gradient at a late step: largest update relative to lr for "
        "AdamNX, AdamNX with per_coordinate_steps, Adam and AdamW.",
        formatter_class=_Formatter,
    )
    stress_arguments(stress)
    return parser


def _fail(message: str) -> int:
    print(f"adamnx: error: {message}", file=sys.stderr)
    return 2


def _print_summary(summary: dict, out_dir: Path) -> None:
    from adamnx.bench.report import summary_table

    header, rows = summary_table(summary)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{summary['task']} — test at the validation-selected checkpoint (mean ± std)")
        for h in header:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        Console().print(table)
    except ImportError:  # pragma: no cover
        print(" | ".join(header))
        for r in rows:
            print(" | ".join(r))
    print(f"report: {out_dir / 'report.md'}")


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """``--nproc N``: start N copies of this command with torchrun on this machine (loopback rendezvous)."""
    import os
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "adamnx",
        *rest,
    ]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))).returncode


# Options that would change a run: --resume continues with the recorded config, so it refuses them.
_RUN_OPTIONS = {
    "task": "--task",
    "quick": "--quick",
    "ablation": "--ablation",
    "sweep": "--sweep",
    "overrides": "--set",
    "data_dir": "--data-dir",
    "framework": "--framework",
    "out": "--out",
}


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    import os

    from adamnx.bench.config import ConfigError
    from adamnx.bench.tasks import DataError

    if args.nproc < 1:
        return _fail(f"--nproc must be ≥ 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_under_torchrun(args.nproc, argv)
    progress = "lines" if args.no_progress else "auto"
    try:
        if args.resume:
            given = [flag for key, flag in _RUN_OPTIONS.items() if getattr(args, key)]
            if given:
                return _fail(
                    f"--resume continues {args.resume} with its recorded config; it takes no {', '.join(given)}"
                )
            return _resume(Path(args.resume), progress)
        return _new_bench(args, progress)
    except (ConfigError, DataError) as exc:
        return _fail(str(exc))
    except ImportError as exc:
        return _fail(f'{exc}. Install the harness\'s dependencies: pip install -e ".[bench]" in a clone of adamnx')


def _interrupted(root: Path) -> int:
    print(f"adamnx: interrupted; continue with: adamnx bench --resume {root}", file=sys.stderr)
    return 130


def _new_bench(args: argparse.Namespace, progress: str) -> int:
    from adamnx.bench.config import load_config
    from adamnx.bench.harness import default_out_dir, run_bench, start_bench, sweep

    if args.study:
        return _study(args, list(args.overrides))
    overrides = list(args.overrides)
    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            return _fail(f"--data-dir {args.data_dir!r} is not a folder")
        overrides.append(f"data_dir={_toml_string(args.data_dir)}")
    if args.framework:
        overrides.append(f"framework={_toml_string(args.framework)}")
    tasks = args.task or list(DEFAULT_TASKS)
    configs = [load_config(t, overrides, quick=args.quick, ablation=args.ablation) for t in tasks]  # all checked first
    if len(configs) == 1:
        root = Path(args.out or default_out_dir(configs[0].task))
        folders = [root]
    else:
        root = Path(args.out or default_out_dir(None))
        folders = [root / cfg.task for cfg in configs]
    if args.sweep:
        for cfg, folder in zip(configs, folders):
            _print_sweep(sweep(cfg, folder, progress=progress), folder)
        return 0
    try:
        prepared = start_bench(configs, folders, root if len(configs) > 1 else None)
        for cfg, folder, ready in zip(configs, folders, prepared):
            summary = run_bench(cfg, folder, resume=True, progress=progress, prepared=ready)
            if summary is not None:  # rank 0
                _print_summary(summary, folder)
    except KeyboardInterrupt:
        if (root / "config.json").exists() or (root / "bench.json").exists():
            return _interrupted(root)
        print("adamnx: interrupted before anything was written", file=sys.stderr)
        return 130
    return 0


def _resume(run_dir: Path, progress: str) -> int:
    import json
    import os

    from adamnx.bench.config import BenchConfig, from_dict
    from adamnx.bench.harness import _broadcast, init_distributed, run_bench

    # Under torchrun only global rank 0 reads the folder (across machines it may exist on rank 0's alone) and hands
    # the configs to the others; their process group starts with the default device ("auto", as rank 0's usually).
    init_distributed(BenchConfig().device)
    recorded = None
    if int(os.environ.get("RANK", "0")) == 0:
        if (run_dir / "bench.json").is_file():
            folders = [run_dir / task for task in json.loads((run_dir / "bench.json").read_text())["tasks"]]
        else:
            folders = [run_dir] if (run_dir / "config.json").is_file() else []
        recorded = [(str(f), json.loads((f / "config.json").read_text())) for f in folders]
    recorded = _broadcast(recorded)
    if not recorded:
        return _fail(f"--resume {str(run_dir)!r} has no config.json or bench.json: not a bench run folder")
    try:
        for folder, config in recorded:
            folder = Path(folder)
            summary = run_bench(from_dict(config), folder, resume=True, progress=progress)
            if summary is not None:  # rank 0
                _print_summary(summary, folder)
    except KeyboardInterrupt:
        return _interrupted(run_dir)
    return 0


def _print_sweep(record: dict, folder: Path) -> None:
    shipped = record["shipped_lr"]
    print(f"{record['task']}: chosen learning rates {record['chosen_lr']} (details in {folder / 'sweep.json'})")
    if shipped is None:
        return
    if shipped == record["chosen_lr"]:
        print(f"{record['task']}: the same as the shipped src/adamnx/bench/sweeps/{record['task']}.json")
    else:
        print(
            f"{record['task']}: the shipped picks (src/adamnx/bench/sweeps/{record['task']}.json) are {shipped}; "
            f"to adopt these, copy {folder / 'sweep.json'} there"
        )


def _study(args: argparse.Namespace, overrides: list[str]) -> int:
    from adamnx.bench.config import load_config
    from adamnx.bench.study import default_sweep_file, run_study, run_sweep, study_config_overrides, study_table

    if args.task and len(args.task) > 1:
        return _fail("--study runs on one --task")
    task = args.task[0] if args.task else "mnist1d"
    cfg = load_config(task, study_config_overrides(overrides))
    sweep_file = Path(args.sweep_file) if args.sweep_file else default_sweep_file(task)
    if args.sweep:
        record = run_sweep(cfg, sweep_file, progress=not args.no_progress)
        print(f"horizon study sweep: chosen learning rates {record['chosen_lr']} (written to {sweep_file})")
        return 0
    out_dir = Path(args.out or f"runs/horizon-{task}")
    summary = run_study(cfg, sweep_file, out_dir, progress=not args.no_progress)
    print(study_table(summary))
    print(f"report: {out_dir / 'report.md'}")
    return 0


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _schedule(args: argparse.Namespace) -> int:
    from adamnx.schedule import beta2_for_horizon, horizon, second_moment_weight

    try:
        if args.horizon is not None:
            print(f"beta2 for a horizon of {args.horizon:g} steps: {beta2_for_horizon(args.horizon):.10f}")
            return 0
        steps = [int(float(s)) for s in args.steps.split(",") if s.strip()]
        if any(s < 1 for s in steps):
            return _fail("--steps must be positive integers")
        betas = args.beta2 or [0.9, 0.99, 0.999]
        print("t".rjust(10) + "".join(f"   beta2={b:<10g}" for b in betas))
        for t in steps:
            print(f"{t:>10d}" + "".join(f"   {second_moment_weight(t, b):<16.4e}" for b in betas))
        print("horizon H = 1/(1-c): " + ", ".join(f"beta2={b:g}: {horizon(b):,.0f} steps" for b in betas))
    except ValueError as exc:
        return _fail(str(exc))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args, argv)
    if args.command == "schedule":
        return _schedule(args)
    if args.command == "stress":
        from adamnx.bench.stress import run_from_args as run_stress

        return run_stress(args)
    from adamnx.bench.perf import run_from_args

    return run_from_args(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
