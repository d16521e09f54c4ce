"""Peak memory of loading a checkpoint (``opt.load_state_dict(torch.load(path))``): how much more than the state it
loads. Each optimizer in a fresh process, its peak RSS measured (``VmHWM`` after resetting it), not computed.

A load copies the state (the optimizer never aliases the caller's tensors), so its floor is one copy of the state:
8 bytes per param for float32 AdamNX, 2.03 for AdamNX8bit. Everything above that is the loader's own.

    python benchmarks/checkpoint_memory.py [--params 16777216] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

OPTIMIZERS = ("AdamNX", "AdamNX8bit")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _torch_version() -> str:
    import torch

    return torch.__version__


def save_one(name: str, numel: int, folder: Path) -> None:
    """A step of one optimizer, saved (in a process of its own: memory it frees would be reused by the load)."""
    import torch

    import adamnx

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel))
    opt = getattr(adamnx, name)([param], lr=1e-3)
    param.grad = torch.randn(numel)
    opt.step()
    torch.save({"param": param.detach(), "optimizer": opt.state_dict()}, folder / f"{name}.pt")


def load_one(name: str, folder: Path) -> dict:
    """The measured load, in a fresh process: the checkpoint read, then ``load_state_dict`` into a new optimizer."""
    import torch

    import adamnx

    saved = torch.load(folder / f"{name}.pt", weights_only=True)
    param = torch.nn.Parameter(saved["param"])
    loader = getattr(adamnx, name)([param], lr=1e-3)
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts over from here
    before = _rss_mb("VmRSS")
    loader.load_state_dict(saved["optimizer"])
    peak = _rss_mb("VmHWM")
    state_mb = sum(t.numel() * t.element_size() for t in loader.state[param].values()) / 2**20
    return {
        "optimizer": name,
        "params": param.numel(),
        "state_mb": round(state_mb, 1),
        "load_extra_peak_mb": round(peak - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=16 * 2**20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save", choices=OPTIMIZERS, help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--load", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save:
        save_one(args.save, args.params, args.folder)
        return
    if args.load:
        print(json.dumps(load_one(args.load, args.folder)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in OPTIMIZERS:
            child = [sys.executable, __file__, "--params", str(args.params), "--folder", folder]
            subprocess.run([*child, "--save", name], check=True)
            done = subprocess.run([*child, "--load", name], check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout))
    lines = [
        f"Loading a checkpoint: {args.params:,} float32 params in one tensor; {_cpu()}, torch {_torch_version()}",
        "",
        "| optimizer | state kept (MB) | extra peak RSS of load_state_dict (MB) | ÷ state |",
        "|---|---|---|---|",
    ]
    for row in rows:
        ratio = row["load_extra_peak_mb"] / row["state_mb"]
        lines.append(f"| {row['optimizer']} | {row['state_mb']} | {row['load_extra_peak_mb']} | {ratio:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "checkpoint_memory.md").write_text(report)
        (args.out / "checkpoint_memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
