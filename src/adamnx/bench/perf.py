"""``adamnx perf`` / ``benchmarks/step_speed.py``: how long the optimizer step takes, AdamNX vs torch's AdamW.

The step is memory-bound: it reads p, g, m, v and writes p, m, v, i.e. 28 bytes per fp32 parameter for both
AdamW and AdamNX. "Effective GB/s" is that traffic divided by the median step time.

Candidates are interleaved (each repetition steps every candidate once, in a new random order each time) so
that machine noise and cache effects hit them alike; medians and ratios to torch's fused AdamW are
reported. Peak extra memory of one step and the fused kernel's first step (which builds the C++ kernel on the
CPU, or compiles the inductor kernel on CUDA) with a cold and a warm cache are measured in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adamnx.bench.arguments import SHAPE_KINDS, perf_arguments, run_folder
from adamnx.bench.markdown import figure

__all__ = ["add_arguments", "run_from_args"]

BYTES_PER_PARAM = 28  # fp32: read p, g, m, v (16) + write p, m, v (12)


def authors_step(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, state=None):
    """A plain single-tensor loop of the authors' algorithm (their published per-tensor code path, naive
    coefficients included): the baseline a user of their repository gets."""
    beta1, beta2 = betas
    for p in params:
        s = state.setdefault(p, {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)})
        s["step"] += 1
        t = s["step"]
        p.mul_(1 - lr * weight_decay)
        beta1_t = (beta1 - beta1**t) / (1 - beta1**t)
        s["exp_avg"].lerp_(p.grad, 1 - beta1_t)
        beta2_t = (1 - beta2 ** ((1 - beta2) * (t - 1))) / (1 - beta2 ** ((1 - beta2) * t))
        s["exp_avg_sq"].mul_(beta2_t).addcmul_(p.grad, p.grad, value=1 - beta2_t)
        p.addcdiv_(s["exp_avg"], s["exp_avg_sq"].sqrt().add_(eps), value=-lr)


class _AuthorsLoop:
    def __init__(self, params):
        self.params, self.state = params, {}

    @torch.no_grad()
    def step(self):
        authors_step(self.params, state=self.state)


def _candidates() -> dict[str, Any]:
    from adamnx import AdamNX
    from adamnx.bench.optimizers import implementation_options

    # Every implementation of the backend table (fused, foreach, for-loop: ``adamnx-fused``, ...), and each with the
    # late-activation guard (per-coordinate step counts), against the same implementation without it.
    rows = {f"adamnx-{name}": options for name, options in implementation_options().items()}
    return {
        **{name: functools.partial(AdamNX, **options) for name, options in rows.items()},
        **{
            f"{name}-guard": functools.partial(AdamNX, **options, per_coordinate_steps=True)
            for name, options in rows.items()
        },
        "adamw-fused": lambda ps: torch.optim.AdamW(ps, fused=True),
        "adamw-foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "adamw-forloop": lambda ps: torch.optim.AdamW(ps, foreach=False),
        "authors-loop": _AuthorsLoop,
        **_compact_candidates(),
    }


def _compact_candidates() -> dict[str, Any]:
    """Compact state (docs/low-precision.md): 8-bit moments, bf16 moments of float32 params, bf16 params (whose
    state is bf16 by default), and torch's AdamW with bf16 params, the twin of AdamNX's foreach with bf16 params."""
    from adamnx import AdamNX, AdamNX8bit

    bf16 = torch.bfloat16
    return {
        "adamnx-8bit-fused": lambda ps: AdamNX8bit(ps, fused=True),
        "adamnx-bf16state-fused": lambda ps: AdamNX(ps, fused=True, state_dtype=bf16),
        "adamnx-bf16-fused": lambda ps: AdamNX(_as_bf16(ps), fused=True),
        "adamnx-bf16-foreach": lambda ps: AdamNX(_as_bf16(ps), foreach=True),
        "adamw-bf16-foreach": lambda ps: torch.optim.AdamW(_as_bf16(ps), foreach=True),
    }


def _as_bf16(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """bf16 copies of params, with bf16 copies of their gradients."""
    copies = []
    for p in params:
        q = p.detach().to(torch.bfloat16).requires_grad_(True)
        q.grad = None if p.grad is None else p.grad.to(torch.bfloat16)
        copies.append(q)
    return copies


# What each AdamNX candidate is compared with, where it is not the same implementation of AdamW: compact state with
# torch's fused AdamW keeping float32 state (what it saves memory against).
TWINS = {name: "adamw-fused" for name in ("adamnx-8bit-fused", "adamnx-bf16state-fused", "adamnx-bf16-fused")}
# Bytes moved per param by a step, where not float32's 28: 8-bit reads p, g (8), codes (2), writes p, codes (6);
# bf16 state with float32 params 8 + 4 + 4 + 4; bf16 params and state 4 + 2 + 4 + 4.
BYTES_MOVED = {
    "adamnx-8bit-fused": 16, "adamnx-bf16state-fused": 20, "adamnx-bf16-fused": 14, "adamnx-bf16-foreach": 14,
    "adamw-bf16-foreach": 14,
}  # fmt: skip


def twin_of(name: str) -> str:
    """The AdamW candidate an AdamNX candidate's paired ratio is taken against."""
    return TWINS.get(name, name.replace("adamnx-", "adamw-"))


EMBEDDING_DIM = 32
EMBEDDING_ACTIVE_ROWS = 0.1  # the fraction of an embedding's rows that get a gradient (rare rows: the guard's case)


def model_shapes(kind: str, n_params: int) -> list[tuple[int, ...]]:
    """'large': four equal matrices (a transformer's big projections); 'small': many conv blocks as in a deep
    CNN (3×3 conv 128→128 + a norm's weight and bias, ~148k params and 3 tensors a block); 'embedding': one
    table of 32-wide rows, of which a tenth get a gradient."""
    if kind == "embedding":
        return [(max(1, n_params // EMBEDDING_DIM), EMBEDDING_DIM)]
    if kind == "large":
        side = max(1, int(math.sqrt(n_params / 4)))
        return [(side, side)] * 4
    block = [(128, 128, 3, 3), (128,), (128,)]
    per_block = sum(math.prod(s) for s in block)
    return block * max(1, round(n_params / per_block))


def _make_params(shapes, device, active_rows: float = 1.0):
    g = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in shapes]
    for p in params:
        grad = torch.randn(p.shape, generator=g)
        if active_rows < 1.0:
            grad[torch.rand(p.shape[0], generator=g) >= active_rows] = 0.0
        p.grad = grad.to(device)
    return params


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(names: list[str], shapes, device, reps: int, active_rows: float = 1.0) -> dict[str, list[float]]:
    """Milliseconds per step for each candidate, interleaved; the first (warm-up/compile) step is excluded."""
    builders = _candidates()
    optimizers = {}
    for name in names:
        opt = builders[name](_make_params(shapes, device, active_rows))
        opt.step()  # state allocation and (fused AdamNX) kernel compilation
        optimizers[name] = opt
    times: dict[str, list[float]] = {n: [] for n in names}
    shuffle = random.Random(0).shuffle
    order = list(optimizers)
    for _ in range(reps):
        # A new order every repetition: no candidate always follows the same one (a predecessor that just freed
        # or dirtied a lot of memory would otherwise bias its successor every time).
        shuffle(order)
        for name in order:
            opt = optimizers[name]
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def stream_bandwidth(n: int, device, reps: int) -> float:
    """GB/s of ``a += b`` over n fp32 values (read a and b, write a: 12 bytes per element): what this machine's
    memory delivers to a streaming kernel that reads and writes in place, as the optimizer step does. (A plain
    copy would understate it: writing to memory not read first costs an extra, uncounted read per line.)"""
    a = torch.randn(n, device=device)
    b = torch.randn(n, device=device)
    a.add_(b)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a.add_(b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 12 * n / statistics.median(times) / 1e9


_PROBE = r"""
import json, sys, time, torch
sys.path.insert(0, {src!r})
from adamnx.bench.perf import _candidates, _make_params, _sync, model_shapes
name, kind, n, device = {name!r}, {kind!r}, {n}, torch.device({device!r})
opt = _candidates()[name](_make_params(model_shapes(kind, n), device))
t0 = time.perf_counter(); opt.step(); _sync(device); first = time.perf_counter() - t0
def rss():
    with open("/proc/self/status") as f:
        return {{l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}}
if device.type == "cuda":
    base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    opt.step(); _sync(device); extra = torch.cuda.max_memory_allocated() - base
else:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss()["VmRSS"]; opt.step(); extra = rss()["VmHWM"] - base
print(json.dumps({{"first_step_s": first, "extra_bytes": extra}}))
"""


def probe(name: str, kind: str, n: int, device: str, cache_dir: str | None = None) -> dict[str, float]:
    """First-step time and peak extra memory of one step, in a fresh process (glibc told to mmap large blocks
    so every temporary shows up in the peak RSS instead of hiding in a reused heap)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if cache_dir is not None:  # both caches: inductor's (CUDA kernel) and ours (the C++ CPU kernel)
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir, "inductor")
        env["ADAMNX_CACHE_DIR"] = os.path.join(cache_dir, "adamnx")
    src = str(Path(__file__).resolve().parents[2])
    code = _PROBE.format(src=src, name=name, kind=kind, n=n, device=device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"probe {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _speed_rows(
    per_round: list[dict[str, list[float]]],
    kind: str,
    n: int,
    tensors: int,
    stream_gbps: float,
    peak_gbps: float | None,
) -> list[dict]:
    """One row per candidate at one (shape, size): medians, bandwidths, ratios to AdamW (paired and per round)."""
    names = list(per_round[0])
    times = {name: [t for r in per_round for t in r[name]] for name in names}
    base = statistics.median(times["adamw-fused"]) if "adamw-fused" in times else float("nan")
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        gbps = BYTES_MOVED.get(name, BYTES_PER_PARAM) * n / (med / 1e3) / 1e9
        row = {
            "shape": kind,
            "params": n,
            "tensors": tensors,
            "candidate": name,
            "median_ms": med,
            "q25_ms": statistics.quantiles(ts, n=4)[0] if len(ts) > 1 else med,
            "q75_ms": statistics.quantiles(ts, n=4)[2] if len(ts) > 1 else med,
            "gb_per_s": gbps,
            "fraction_of_stream_bandwidth": gbps / stream_gbps,
            "fraction_of_peak_bandwidth": gbps / peak_gbps if peak_gbps else None,
            "ratio_to_adamw_fused": med / base,
            "paired_ratio_to_adamw_same_impl": None,
            "round_ratios_to_adamw_same_impl": None,
            "paired_ratio_to_unguarded": None,
        }
        unguarded = name.removesuffix("-guard")
        if unguarded != name and unguarded in times:  # the late-activation guard against the same implementation
            row["paired_ratio_to_unguarded"] = statistics.median(a / b for a, b in zip(ts, times[unguarded]))
        twin = twin_of(name)
        if name.startswith("adamnx-") and twin in times:
            # Both stepped in every repetition, so the median of step-by-step ratios shrugs off noise that
            # moves whole repetitions; the per-round ratios of medians show how much whole runs move.
            row["paired_ratio_to_adamw_same_impl"] = statistics.median(a / b for a, b in zip(ts, times[twin]))
            row["round_ratios_to_adamw_same_impl"] = [
                statistics.median(r[name]) / statistics.median(r[twin]) for r in per_round
            ]
        rows.append(row)
    return rows


def _memory_rows(names: list[str], kinds: list[str], size: int, device: str) -> list[dict]:
    rows = []
    for kind in kinds:
        for name in names:
            extra = probe(name, kind, size, device)["extra_bytes"]
            rows.append({"shape": kind, "params": size, "candidate": name, "extra_mb": extra / 2**20})
    return rows


def _compile_times(device: str) -> dict[str, float]:
    """First fused step with an empty kernel cache (cold: builds it) and with the cache it left (warm)."""
    with tempfile.TemporaryDirectory() as cache:
        cold = probe("adamnx-fused", "large", 1_000_000, device, cache_dir=cache)["first_step_s"]
        warm = probe("adamnx-fused", "large", 1_000_000, device, cache_dir=cache)["first_step_s"]
    return {"cold_first_step_s": cold, "warm_first_step_s": warm}


def run(
    names: list[str],
    out_dir: Path,
    *,
    sizes: list[int],
    kinds: list[str],
    reps: int,
    device: str,
    memory_size: int = 0,
    compile_probe: bool = True,
    rounds: int = 1,
    peak_gbps: float | None = None,
) -> dict:
    """Time every candidate in ``names`` at every (shape, size); each of ``rounds`` rounds builds fresh optimizers
    and steps them ``reps`` times, interleaved. Medians are over all steps of all rounds; the per-round ratios show
    the spread. Then the memory probe (``memory_size`` params; 0: none) and the compile probe; writes ``out_dir``."""
    dev = torch.device(device)
    results: dict[str, Any] = {
        "machine": _machine(dev),
        "rows": [],
        "memory": [],
        "compile": {},
        "rounds": rounds,
        "peak_gbps": peak_gbps,
        "stream_gb_per_s": {},
    }
    for kind in kinds:
        for n in sizes:
            shapes = model_shapes(kind, n)
            n_actual = sum(math.prod(s) for s in shapes)
            active = EMBEDDING_ACTIVE_ROWS if kind == "embedding" else 1.0
            per_round = [time_steps(names, shapes, dev, reps, active) for _ in range(rounds)]
            stream_gbps = results["stream_gb_per_s"].setdefault(n_actual, stream_bandwidth(n_actual, dev, reps))
            results["rows"] += _speed_rows(per_round, kind, n_actual, len(shapes), stream_gbps, peak_gbps)
            medians = {name: statistics.median(t for r in per_round for t in r[name]) for name in names}
            print(
                f"  {kind:5s} {n_actual / 1e6:6.1f}M: " + ", ".join(f"{k} {v:.1f}ms" for k, v in medians.items()),
                flush=True,
            )
    if memory_size:
        results["memory"] = _memory_rows(names, kinds, memory_size, device)
    if compile_probe and "adamnx-fused" in names:
        results["compile"] = _compile_times(device)
    write_outputs(results, out_dir)
    return results


def _machine(device: torch.device) -> dict[str, Any]:
    from adamnx.bench.environment import environment

    info = {"device": str(device), **environment()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_outputs(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "step_speed.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Optimizer step speed",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()),
        "",
        f"Medians over {results.get('rounds', 1)} round(s) (fresh optimizers each) of interleaved steps. × fused AdamW:",
        "ratio of medians. × AdamW same impl: median over repetitions of AdamNX's step time over the same",
        "implementation of AdamW's (compact state: torch's fused AdamW), stepped in the same repetition (paired).",
        "",
        "GB/s: 28 bytes per parameter over the median step (compact state: 16 for 8-bit, 20 for bf16 state, 14 with"
        " bf16 params); % stream: of the GB/s of `a += b` at that size"
        + (f"; % peak: of the stated {results['peak_gbps']:.0f} GB/s." if results.get("peak_gbps") else "."),
        "",
        "| shape | params | tensors | candidate | median ms | GB/s | % stream | × fused AdamW | × AdamW same impl |"
        + (" % peak |" if results.get("peak_gbps") else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if results.get("peak_gbps") else ""),
    ]
    for r in results["rows"]:
        paired = r.get("paired_ratio_to_adamw_same_impl")
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['candidate']} | {r['median_ms']:.2f} "
            f"| {r['gb_per_s']:.1f} | {100 * r['fraction_of_stream_bandwidth']:.0f} | {r['ratio_to_adamw_fused']:.2f} "
            f"| {'' if paired is None else f'{paired:.2f}'} |"
            + (f" {100 * r['fraction_of_peak_bandwidth']:.0f} |" if r.get("fraction_of_peak_bandwidth") else "")
        )
    lines += _target_lines(results["rows"])
    lines += _guard_lines(results["rows"])
    if results["memory"]:
        lines += [
            "",
            "Peak extra memory during one step (beyond params, grads and state):",
            "",
            "| shape | params | candidate | extra MB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['shape']} | {m['params'] / 1e6:.0f}M | {m['candidate']} | {m['extra_mb']:.1f} |"
            for m in results["memory"]
        ]
    if results["compile"]:
        c = results["compile"]
        lines += [
            "",
            f"Fused AdamNX first step (kernel build on the CPU / compilation on CUDA, 1M params): cold cache {c['cold_first_step_s']:.1f} s, "
            f"warm cache {c['warm_first_step_s']:.1f} s.",
        ]
    with contextlib.suppress(ImportError):  # matplotlib is in the bench extra
        _plot(results, out_dir / "step_speed.png")
        lines += ["", figure("step_speed.png", "AdamNX's step time over AdamW's, per implementation and size")]
    (out_dir / "step_speed.md").write_text("\n".join(lines) + "\n")


# The speed targets: AdamNX's step time over the same implementation of AdamW's, at 10M parameters and more.
TARGETS = {
    "adamnx-fused": 1.05, "adamnx-foreach": 1.0, "adamnx-forloop": 1.0,
    # compact state against torch's fused AdamW with float32 state; bf16 params' foreach against AdamW's (#23)
    "adamnx-8bit-fused": 0.75, "adamnx-bf16state-fused": 0.85, "adamnx-bf16-fused": 0.85, "adamnx-bf16-foreach": 1.0,
}  # fmt: skip


def _target_lines(rows: list[dict]) -> list[str]:
    """The targets, checked against both ratios (ratio of medians and the paired median ratio)."""
    lines = []
    for r in rows:
        if r["candidate"] not in TARGETS or r["params"] < 9_000_000:
            continue
        twin_name = twin_of(r["candidate"])
        twins = [q for q in rows if (q["candidate"], q["shape"], q["params"]) == (twin_name, r["shape"], r["params"])]
        if not twins:
            continue
        bar = TARGETS[r["candidate"]]
        of_medians, paired = r["median_ms"] / twins[0]["median_ms"], r["paired_ratio_to_adamw_same_impl"]
        spread = r["round_ratios_to_adamw_same_impl"]
        met = "met" if max(of_medians, paired) <= bar else ("met (paired)" if paired <= bar else "NOT met")
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.0f}M | {r['candidate']} | ≤ {bar:.2f} | {of_medians:.2f} "
            f"| {paired:.2f} | {min(spread):.2f}–{max(spread):.2f} | {met} |"
        )
    if not lines:
        return []
    return [
        "",
        "Targets (AdamNX ÷ AdamW, same implementation; compact state ÷ torch's fused AdamW with float32 state;"
        " ≥ 10M params):",
        "",
        "| shape | params | candidate | target | ratio of medians | paired ratio | range over rounds | |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]


# The guard's targets: its step time over the same implementation's without it (per_coordinate_steps off).
GUARD_TARGETS = {"adamnx-fused-guard": 1.1, "adamnx-foreach-guard": 1.3}


def _guard_lines(rows: list[dict]) -> list[str]:
    """The late-activation guard's cost: paired ratio to the same implementation without it, at ≥ 1M params."""
    lines = []
    for r in rows:
        paired = r.get("paired_ratio_to_unguarded")
        if paired is None or r["params"] < 1_000_000:
            continue
        twin = next(
            q
            for q in rows
            if (q["candidate"], q["shape"], q["params"]) == (r["candidate"][:-6], r["shape"], r["params"])
        )
        bar = GUARD_TARGETS.get(r["candidate"])
        of_medians = r["median_ms"] / twin["median_ms"]
        verdict = "" if bar is None else ("met" if max(of_medians, paired) <= bar else "NOT met")
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['candidate']} | {twin['median_ms']:.2f} "
            f"| {r['median_ms']:.2f} | {'' if bar is None else f'≤ {bar:.2f}'} | {of_medians:.2f} | {paired:.2f} "
            f"| {verdict} |"
        )
    if not lines:
        return []
    return [
        "",
        "The late-activation guard (`per_coordinate_steps=True`) ÷ the same implementation without it, ≥ 1M params:",
        "",
        "| shape | params | candidate | ms without | ms with | target | ratio of medians | paired ratio | |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["shape"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in results["rows"] if r["shape"] == kind]
        for name in dict.fromkeys(r["candidate"] for r in rows):
            pts = [(r["params"], r["median_ms"]) for r in rows if r["candidate"] == name]
            ax.loglog(*zip(*pts), marker="o", ls="-" if name.startswith("adamnx") else "--", label=name)
        ax.set_title(f"{kind} tensors")
        ax.set_xlabel("parameters")
        ax.set_ylabel("ms per step (median)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


add_arguments = perf_arguments  # benchmarks/step_speed.py builds its parser with these


def run_from_args(args: argparse.Namespace) -> int:
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
        kinds = [k.strip() for k in args.shapes.split(",")]
        names = list(_candidates()) if args.candidates == "all" else [c.strip() for c in args.candidates.split(",")]
    except ValueError as exc:
        print(f"adamnx: error: {exc}", file=sys.stderr)
        return 2
    unknown = [k for k in kinds if k not in SHAPE_KINDS] + [c for c in names if c not in _candidates()]
    if unknown or any(s < 1 for s in sizes) or args.reps < 1 or args.rounds < 1:
        print(
            f"adamnx: error: bad perf arguments {unknown or ''} (shapes: {', '.join(SHAPE_KINDS)}; "
            f"candidates: {', '.join(_candidates())})",
            file=sys.stderr,
        )
        return 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        args.out = str(run_folder("perf"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("adamnx: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    results = run(
        names,
        Path(args.out),
        sizes=sizes,
        kinds=kinds,
        reps=args.reps,
        device=args.device,
        memory_size=int(args.memory_size),
        compile_probe=not args.no_compile_probe,
        rounds=args.rounds,
        peak_gbps=args.peak_gbps,
    )
    print((Path(args.out) / "step_speed.md").read_text())
    return 0 if results["rows"] else 1
