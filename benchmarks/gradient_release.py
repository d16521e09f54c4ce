"""Peak memory and time of a training step with gradient release (``adamnx.release_gradients``) against the
ordinary loop, on a model of ≥ 50M float32 params: each configuration in a fresh process, its peak RSS measured
(``ru_maxrss``), not computed.

The model is a stack of square Linear layers fed a small batch, so that params, gradients and optimizer state
dominate the memory (activations are a few MB). Peak RSS counts everything the process holds (the interpreter and
torch's libraries too): compare configurations, and the difference with the gradients' bytes.

    python benchmarks/gradient_release.py [--layers 8] [--width 2560] [--steps 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "AdamW fused (torch)": {"optimizer": "adamw", "release": False},
    "AdamNX fused": {"optimizer": "adamnx", "release": False},
    "AdamNX fused, gradient release": {"optimizer": "adamnx", "release": True},
    "AdamNX foreach, gradient release": {"optimizer": "adamnx-foreach", "release": True},
    "AdamNX8bit fused": {"optimizer": "adamnx8bit", "release": False},
    "AdamNX8bit fused, gradient release": {"optimizer": "adamnx8bit", "release": True},
}


def _peak_rss_mb() -> float:
    """The process's peak resident memory since it started, or since the last :func:`_reset_peak` (Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def _reset_peak() -> bool:
    """Start the peak over from the current resident memory (Linux: /proc/self/clear_refs); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_one(config: str, layers: int, width: int, steps: int, threads: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    import adamnx
    from adamnx.backends import fused_cpu

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(4, width)
    kind = CONFIGS[config]
    if kind["optimizer"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    elif kind["optimizer"] == "adamnx-foreach":
        opt = adamnx.AdamNX(model.parameters(), lr=1e-4, foreach=True)
    elif kind["optimizer"] == "adamnx8bit":
        opt = adamnx.AdamNX8bit(model.parameters(), lr=1e-4, fused=True)
        fused_cpu.prepare()
    else:
        opt = adamnx.AdamNX(model.parameters(), lr=1e-4, fused=True)
        fused_cpu.prepare()  # build or load the C++ kernel now: not in the timed steps
    release = adamnx.release_gradients(opt) if kind["release"] else None
    before = _peak_rss_mb()

    def train_step() -> float:
        start = time.perf_counter()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        return time.perf_counter() - start

    train_step()  # creates the optimizer state
    first_peak = _peak_rss_mb()
    reset = _reset_peak()  # the steady state's peak: without the first step's (state created amid the gradients)
    times = [train_step() for _ in range(steps)]
    if release is not None:
        release.remove()
    return {
        "config": config,
        "params": params,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_first_step_mb": first_peak,
        "peak_reset": reset,
        "rss_before_training_mb": before,
        "median_step_ms": 1e3 * statistics.median(times),
    }


def paired_times(layers: int, width: int, steps: int, threads: int) -> dict:
    """Training-step time of gradient release over the ordinary loop (fused AdamNX both), stepped alternately in
    one process: the median of per-step ratios (this VM's timings drift; separate processes are not comparable)."""
    import copy

    import torch

    import adamnx

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain_model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    released_model = copy.deepcopy(plain_model)
    plain = adamnx.AdamNX(plain_model.parameters(), lr=1e-4, fused=True)
    released = adamnx.AdamNX(released_model.parameters(), lr=1e-4, fused=True)
    adamnx.release_gradients(released)
    x = torch.randn(4, width)

    def train_step(model, opt) -> float:
        start = time.perf_counter()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        return time.perf_counter() - start

    ratios, plain_ms, released_ms = [], [], []
    for i in range(steps + 1):
        order = [(plain_model, plain), (released_model, released)][:: 1 if i % 2 else -1]
        t = {id(opt): train_step(model, opt) for model, opt in order}
        if i:  # the first creates the state
            plain_ms.append(1e3 * t[id(plain)])
            released_ms.append(1e3 * t[id(released)])
            ratios.append(t[id(released)] / t[id(plain)])
    return {
        "median_ratio": statistics.median(ratios),
        "plain_median_ms": statistics.median(plain_ms),
        "released_median_ms": statistics.median(released_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2560)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/gradient-release")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration and print its JSON
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)  # internal: the paired timing
    args = parser.parse_args()
    shape = ["--layers", str(args.layers), "--width", str(args.width), "--threads", str(args.threads)]
    if args.one:
        print(json.dumps(run_one(args.one, args.layers, args.width, args.steps, args.threads)))
        return
    if args.paired:
        print(json.dumps(paired_times(args.layers, args.width, args.steps, args.threads)))
        return

    def fresh_process(*extra: str) -> dict:
        cmd = [sys.executable, __file__, *extra, *shape, "--steps", str(args.steps)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    rows = [fresh_process("--one", config) for config in CONFIGS]
    write(rows, fresh_process("--paired"), Path(args.out), vars(args))


def write(rows: list[dict], paired: dict, out: Path, config: dict) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    machine = {"cpu": _cpu_model(), "torch": torch.__version__, "MALLOC_MMAP_THRESHOLD_": threshold}
    record = {"config": config, "machine": machine, "rows": rows, "paired_times": paired}
    (out / "gradient_release.json").write_text(json.dumps(record, indent=1))
    params = rows[0]["params"]
    grad_mb = 4 * params / 2**20
    plain = next(r for r in rows if r["config"] == "AdamNX fused")
    lines = [
        "# Gradient release: peak memory of a training step",
        "",
        f"{params / 1e6:.1f}M float32 params ({config['layers']} Linear layers of {config['width']}²), batch of 4, "
        f"{config['threads']} threads, {config['steps']} steps (medians without the first); each row a fresh "
        f"process. {machine['cpu']}, torch {machine['torch']}. The gradients of all params take {grad_mb:.0f} MB.",
        "",
        "Allocator: "
        + (
            f"glibc with `MALLOC_MMAP_THRESHOLD_={threshold}` (large blocks mmapped, returned to the system when freed)."
            if threshold
            else "glibc's defaults (its mmap threshold rises to the size of a freed block: freed gradients then stay "
            "in the heap, resident)."
        ),
        "",
        "| configuration | peak RSS MB, steady steps | saved vs AdamNX fused, MB | peak RSS MB, first step | "
        "median ms per training step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        saved = plain["peak_rss_mb"] - r["peak_rss_mb"]
        lines.append(
            f"| {r['config']} | {r['peak_rss_mb']:.0f} | {saved:+.0f} | {r['peak_rss_first_step_mb']:.0f} | "
            f"{r['median_step_ms']:.0f} |"
        )
    lines += [
        "",
        "Steady steps: the peak over the steps after the first (Linux's VmHWM, reset after the first step"
        + ("" if all(r["peak_reset"] for r in rows) else "; NOT reset on this machine: the whole run's peak")
        + "). The first step creates the optimizer state (8 bytes per param; 2.03 for AdamNX8bit) amid the gradients; its peak is the "
        "process's until then. A training step is zero_grad, forward, backward and step; with gradient release the "
        "step runs inside the backward pass (each param as soon as its gradient is ready) and `step()` is a no-op.",
        "",
        f"Time, paired (both fused AdamNX, stepped alternately in one process, {config['steps']} steps): gradient "
        f"release takes {paired['median_ratio']:.2f}× the ordinary loop's training step (medians "
        f"{paired['released_median_ms']:.0f} and {paired['plain_median_ms']:.0f} ms); the times in the table come "
        "from separate processes and are not comparable with each other on this VM.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "gradient_release.md").write_text(text)
    print(text)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
