"""The arguments of ``adamnx perf`` and ``adamnx stress``, defined without importing torch: ``adamnx --help`` answers
at once. Their defaults that need torch (the device, the candidates) are resolved when the command runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["SHAPE_KINDS", "perf_arguments", "run_folder", "stress_arguments"]

SHAPE_KINDS = ("large", "small", "embedding")


def run_folder(command: str, root: str = "runs") -> Path:
    """A new run folder for a command: runs/<timestamp>-<command> (never the repository's recorded results)."""
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}"


def perf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated parameter counts")
    parser.add_argument(
        "--shapes",
        default="large,small",
        help=f"comma-separated, of {', '.join(SHAPE_KINDS)}: large (few big matrices), small (many conv blocks), "
        "embedding (one table, a tenth of its rows active)",
    )
    parser.add_argument("--reps", type=int, default=15, help="timed steps per candidate and round")
    parser.add_argument("--rounds", type=int, default=1, help="independent rounds (fresh optimizers each)")
    parser.add_argument(
        "--peak-gbps", type=float, default=None, help="the device's rated memory bandwidth, for a %% of peak column"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ...; auto: cuda when there is one, else cpu")
    parser.add_argument(
        "--candidates",
        default="all",
        help="comma-separated subset of: adamnx-<implementation> and adamnx-<implementation>-guard for each "
        "implementation (fused, foreach, forloop), adamw-fused, adamw-foreach, adamw-forloop, authors-loop; compact "
        "state: adamnx-8bit-fused, adamnx-bf16state-fused, adamnx-bf16-fused, adamnx-bf16-foreach, adamw-bf16-foreach",
    )
    parser.add_argument("--memory-size", type=float, default=1e7, help="params for the memory probe (0: skip)")
    parser.add_argument("--no-compile-probe", action="store_true", help="skip the cold/warm compile timing")
    parser.add_argument(
        "--out", default=None, help="folder for step_speed.{json,md,png} (default: a new runs/<timestamp>-perf)"
    )


def stress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--t-late", type=int, default=20_000, help="step at which rare rows appear")
    parser.add_argument("--extra-steps", type=int, default=500, help="steps after t-late")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every candidate")
    parser.add_argument("--seed", type=int, default=0, help="the data's and the model's seed")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a tiny model: a second thread only spin-waits)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: a new runs/<timestamp>-stress)")
