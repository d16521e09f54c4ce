"""The late-activation guard's dearest case for the fused CPU step, which `adamnx perf` does not time: an embedding
whose rows have all started, at different steps, so that neighbouring rows' counts differ (each row its own
coefficients). Prints fused with the guard ÷ fused without it (medians of interleaved steps).

    python benchmarks/guard_started_rows.py [--rows 200000] [--dim 32] [--reps 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adamnx import AdamNX
from adamnx.guard import layout_of


def _optimizer(rows: int, dim: int, guard: bool) -> AdamNX:
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(rows, dim, generator=gen).requires_grad_(True)
    start = torch.randint(1, 30, (rows, 1), generator=gen)  # each row starts at its own step
    opt = AdamNX([param], lr=1e-3, fused=True, per_coordinate_steps=guard)
    for t in range(1, 32):
        # never exactly 0 (randn is, now and then): a row that starts with a zero in it would end the walk by row
        param.grad = (torch.rand(rows, dim, generator=gen) + 0.5) * (start <= t)
        opt.step()
    return opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    optimizers = {"fused": _optimizer(args.rows, args.dim, False), "fused+guard": _optimizer(args.rows, args.dim, True)}
    state = optimizers["fused+guard"].state[optimizers["fused+guard"].param_groups[0]["params"][0]]
    param = optimizers["fused+guard"].param_groups[0]["params"][0]
    layout = layout_of(state["coord_lag"], param.shape)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.reps):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.rows} x {args.dim}, every row started (lags kept per {layout}), torch threads {torch.get_num_threads()}"
    )
    print(", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items()))
    print(f"fused+guard / fused: {medians['fused+guard'] / medians['fused']:.2f}")


if __name__ == "__main__":
    main()
