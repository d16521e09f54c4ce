"""Compact optimizer state: step time and state bytes per param of bf16 and 8-bit AdamNX against torch's AdamW and the
8-bit optimizers of bitsandbytes and torchao (where they are installed: optional, never a dependency of adamnx).

Every candidate steps the same shapes (four equal matrices, 20M params by default) with fixed gradients; the steps are
interleaved, in a new random order each repetition, and each candidate's time is compared with torch's fused AdamW
(float32 state) as the median of step-by-step ratios in the same repetition (paired: this VM's speed drifts). State
bytes are measured from the tensors each optimizer's state holds (codes, scales, moments; the step counters too),
not computed from the format.

    python benchmarks/compact_state.py [--params 2e7] [--reps 15] [--threads 2] [--out runs/compact-state]
    PYTHONPATH=/path/to/bnb-and-torchao python benchmarks/compact_state.py   # with the anchors
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adamnx import AdamNX, AdamNX8bit

F32, BF16 = torch.float32, torch.bfloat16


def _anchors() -> dict[str, tuple[torch.dtype, Callable[[list], Any]]]:
    """bitsandbytes' and torchao's 8-bit (and 4-bit) AdamW, where they import."""
    found: dict[str, tuple[torch.dtype, Callable[[list], Any]]] = {}
    try:
        import bitsandbytes as bnb

        found[f"bitsandbytes {bnb.__version__} AdamW8bit"] = (F32, lambda ps: bnb.optim.AdamW8bit(ps))
    except Exception as exc:  # not installed, or no CPU backend in this version
        print(f"bitsandbytes: not measured ({type(exc).__name__}: {str(exc)[:80]})")
    try:
        import torchao
        from torchao.optim import AdamW4bit, AdamW8bit

        found[f"torchao {torchao.__version__} AdamW8bit"] = (F32, lambda ps: AdamW8bit(ps))
        found[f"torchao {torchao.__version__} AdamW4bit"] = (F32, lambda ps: AdamW4bit(ps))
    except Exception as exc:
        print(f"torchao: not measured ({type(exc).__name__}: {str(exc)[:80]})")
    return found


CANDIDATES: dict[str, tuple[torch.dtype, Callable[[list], Any]]] = {
    "AdamW fused, float32": (F32, lambda ps: torch.optim.AdamW(ps, fused=True)),
    "AdamNX fused, float32": (F32, lambda ps: AdamNX(ps, fused=True)),
    "AdamNX fused, float32 params + bf16 state": (F32, lambda ps: AdamNX(ps, fused=True, state_dtype=BF16)),
    "AdamNX fused, bf16 params + bf16 state": (BF16, lambda ps: AdamNX(ps, fused=True)),
    "AdamNX8bit fused, float32 params": (F32, lambda ps: AdamNX8bit(ps, fused=True)),
    "AdamNX8bit fused, bf16 params": (BF16, lambda ps: AdamNX8bit(ps, fused=True)),
    "AdamW foreach, bf16 params": (BF16, lambda ps: torch.optim.AdamW(ps, foreach=True)),
    "AdamNX foreach, bf16 params": (BF16, lambda ps: AdamNX(ps, foreach=True)),
    "AdamNX foreach, float32 params + bf16 state": (F32, lambda ps: AdamNX(ps, foreach=True, state_dtype=BF16)),
    "AdamNX8bit foreach, float32 params": (F32, lambda ps: AdamNX8bit(ps, foreach=True)),
}
BASE = "AdamW fused, float32"
FOREACH_BASE = "AdamW foreach, bf16 params"


def _tensors_of(value: Any) -> list[torch.Tensor]:
    """The plain tensors a state value holds (a tensor subclass such as torchao's is walked to its inner ones)."""
    if not isinstance(value, torch.Tensor):
        return []
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
        names, _ = value.__tensor_flatten__()
        return [t for name in names for t in _tensors_of(getattr(value, name))]
    return [value]


def state_bytes(opt: Any) -> int:
    """Bytes held by the optimizer's state, each storage counted once."""
    seen: dict[int, int] = {}
    for p_state in opt.state.values():
        for value in p_state.values():
            for t in _tensors_of(value):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def run(n_params: int, reps: int, seed: int = 0) -> dict:
    side = int((n_params / 4) ** 0.5) // 16 * 16  # sizes a multiple of 256: torchao quantizes only those
    shapes = [(side, side)] * 4
    params_count = 4 * side * side
    candidates = {**CANDIDATES, **_anchors()}
    optimizers, rows = {}, {}
    g = torch.Generator().manual_seed(seed)
    base_params = [torch.randn(s, generator=g) for s in shapes]
    base_grads = [torch.randn(s, generator=g) for s in shapes]
    for name, (dtype, build) in candidates.items():
        params = [p.to(dtype, copy=True).requires_grad_(True) for p in base_params]  # each its own copy
        for p, grad in zip(params, base_grads):
            p.grad = grad.to(dtype)
        try:
            opt = build(params)
            opt.step()  # state, kernels
            opt.step()
        except Exception as exc:
            print(f"{name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        optimizers[name] = opt
        rows[name] = {"candidate": name, "state_bytes_per_param": state_bytes(opt) / params_count, "times_ms": []}
    order = list(optimizers)
    shuffle = random.Random(seed).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            optimizers[name].step()
            rows[name]["times_ms"].append(1e3 * (time.perf_counter() - start))
    for row in rows.values():
        row["median_ms"] = statistics.median(row["times_ms"])
        for key, base in (("paired_ratio_to_adamw_fused", BASE), ("paired_ratio_to_adamw_foreach_bf16", FOREACH_BASE)):
            if base in rows:
                row[key] = statistics.median(a / b for a, b in zip(row["times_ms"], rows[base]["times_ms"]))
    return {"params": params_count, "shapes": shapes, "rows": list(rows.values())}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def write(result: dict, out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": _cpu_model(), "threads": args.threads, "torch": torch.__version__}
    (out / "compact_state.json").write_text(json.dumps({**result, "machine": machine, "reps": args.reps}, indent=1))
    lines = [
        "# Compact state: step time and state bytes per param",
        "",
        f"{result['params'] / 1e6:.1f}M params (four {result['shapes'][0][0]}² matrices), fixed gradients, "
        f"{args.threads} threads, {args.reps} interleaved steps per candidate (a new order each repetition); "
        f"{machine['cpu']}, torch {machine['torch']}. Ratios are medians of step-by-step ratios in the same "
        "repetition (paired). State bytes: measured from the tensors each optimizer's state holds.",
        "",
        "| candidate | median ms per step | ÷ AdamW fused (float32), paired | ÷ AdamW foreach (bf16), paired | "
        "state bytes per param |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        fused, foreach = (row.get(key) for key in ("paired_ratio_to_adamw_fused", "paired_ratio_to_adamw_foreach_bf16"))
        lines.append(
            f"| {row['candidate']} | {row['median_ms']:.1f} | {_ratio(fused)} | {_ratio(foreach)} | "
            f"{row['state_bytes_per_param']:.2f} |"
        )
    (out / "compact_state.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=2e7)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/compact-state")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    write(run(int(args.params), args.reps), Path(args.out), args)


if __name__ == "__main__":
    main()
