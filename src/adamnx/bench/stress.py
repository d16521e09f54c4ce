"""``adamnx stress``: the late-activation hazard, measured.

A bag-of-embeddings classifier trains on tokens from a frequent vocabulary; at step ``t_late`` rare tokens,
whose embedding rows never had a gradient, start to appear. Their rows' v is 0, so AdamNX (per-tensor step
count t_late) gives them (1 − β̂2_t)·g² and a first update of ≈ 0.1/√(1 − β̂2_t) × lr; Adam's is ≈ 3× lr at
most. We record the largest |Δθ|/lr over those rows at activation, for AdamNX with and without
``per_coordinate_steps=True`` (the guard) in each implementation, Adam and AdamW — and, as a contrast, for a layer
unfrozen at t_late, which is safe: it is its own tensor, so its step count starts at 1. Beside each effect, the
median time of ``optimizer.step()``: the guard's cost on this model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from adamnx import AdamNX
from adamnx.bench.arguments import run_folder
from adamnx.bench.markdown import figure
from adamnx.bench.optimizers import implementation_options

__all__ = ["run_from_args", "run_stress"]


def _adamnx(impl: dict, guard: bool):
    return lambda params, lr: AdamNX(params, lr=lr, weight_decay=0.0, per_coordinate_steps=guard, **impl)


CANDIDATES = {
    **{
        f"adamnx-{name}{'+guard' if guard else ''}": _adamnx(impl, guard)
        for name, impl in implementation_options().items()
        for guard in (False, True)
    },
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
}


class _BagModel(nn.Module):
    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.late = nn.Linear(dim, dim)  # frozen until t_late (its own tensor)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens).mean(1)
        return self.head(h + self.late(h))


def run_stress(
    steps: int = 20_500,
    t_late: int = 20_000,
    vocab: int = 1_000,
    frequent: int = 900,
    lr: float = 1e-3,
    seed: int = 0,
    candidates: list[str] | None = None,
) -> dict:
    """Train each candidate; return, per candidate, the largest |Δθ|/lr of the rare rows and of the late layer, and
    the median milliseconds of a step."""
    results = {}
    for name in candidates or list(CANDIDATES):
        build = CANDIDATES[name]
        torch.manual_seed(seed)
        model = _BagModel(vocab, 16, 4)
        model.late.requires_grad_(False)
        labels_of = torch.randint(0, 4, (vocab,), generator=torch.Generator().manual_seed(seed))
        opt = build([p for n, p in model.named_parameters() if not n.startswith("late.")], lr)
        gen = torch.Generator().manual_seed(seed + 1)
        worst_rare, worst_late, worst_frequent, trace, step_ms = 0.0, 0.0, 0.0, [], []
        for step in range(steps):
            if step == t_late:
                model.late.requires_grad_(True)
                opt.add_param_group({"params": list(model.late.parameters())})
            high = vocab if step >= t_late else frequent
            tokens = torch.randint(0, high, (32, 8), generator=gen)
            loss = nn.functional.cross_entropy(model(tokens), labels_of[tokens[:, 0]])
            opt.zero_grad()
            loss.backward()
            measure = step >= t_late - 5
            if measure:
                emb_before = model.embedding.weight.detach().clone()
                late_before = model.late.weight.detach().clone()
            start = time.perf_counter()
            opt.step()
            step_ms.append((time.perf_counter() - start) * 1e3)
            if measure:
                delta = (model.embedding.weight.detach() - emb_before).abs() / lr
                rare, freq = delta[frequent:].max().item(), delta[:frequent].max().item()
                late = (model.late.weight.detach() - late_before).abs().max().item() / lr
                worst_rare, worst_frequent, worst_late = (
                    max(worst_rare, rare),
                    max(worst_frequent, freq),
                    max(worst_late, late),
                )
                trace.append({"step": step + 1, "rare": rare, "frequent": freq, "late_layer": late})
        results[name] = {
            "max_rare_update_over_lr": worst_rare,
            "max_frequent_update_over_lr": worst_frequent,
            "max_late_layer_update_over_lr": worst_late,
            "final_loss": loss.item(),
            "median_step_ms": statistics.median(step_ms[len(step_ms) // 10 :]),  # past the first steps (warm-up)
            "trace": trace,
        }
    return results


def write_outputs(results: dict, out_dir: Path, config: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "late_activation.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    lines = [
        "# Late-activation stress test",
        "",
        f"Config: {config}. Rare embedding rows (never a gradient before) appear at step {config['t_late']}; a frozen "
        "layer is unfrozen at the same step. Largest |Δθ|/lr over the steps after activation:",
        "",
        "| optimizer | rare rows (first gradient) | frequent rows | unfrozen layer | final loss | step ms | "
        "× without the guard |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        unguarded = results.get(name.removesuffix("+guard")) if name.endswith("+guard") else None
        cost = f"{r['median_step_ms'] / unguarded['median_step_ms']:.2f}" if unguarded else ""
        lines.append(
            f"| {name} | {r['max_rare_update_over_lr']:.1f} | {r['max_frequent_update_over_lr']:.2f} | "
            f"{r['max_late_layer_update_over_lr']:.2f} | {r['final_loss']:.3f} | {r['median_step_ms']:.3f} | {cost} |"
        )
    lines += [
        "",
        f"Step times: median over all but the first tenth of the steps, {config.get('threads', torch.get_num_threads())} "
        "torch thread(s); the model "
        f"is small ({config.get('params', 'a 1,000-row embedding')}), so they measure per-step overhead as much as "
        "arithmetic: `adamnx perf --shapes embedding` times the guard on a large table.",
    ]
    with contextlib.suppress(ImportError):  # matplotlib is in the bench extra
        _plot(results, config, out_dir / "late_activation.png")
        lines += ["", figure("late_activation.png", "largest update of the rare rows over lr, per step")]
    text = "\n".join(lines) + "\n"
    (out_dir / "late_activation.md").write_text(text)
    return text


def run_from_args(args: argparse.Namespace) -> int:
    if args.t_late < 1 or args.extra_steps < 1 or not args.lr > 0 or args.threads < 1:
        print("adamnx: error: --t-late, --extra-steps and --threads must be ≥ 1 and --lr > 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = {
        "t_late": args.t_late,
        "steps": args.t_late + args.extra_steps,
        "lr": args.lr,
        "seed": args.seed,
        "beta2": 0.99,
        "threads": args.threads,
    }
    results = run_stress(config["steps"], args.t_late, lr=args.lr, seed=args.seed)
    print(write_outputs(results, Path(args.out) if args.out else run_folder("stress"), config))
    return 0


def _plot(results: dict, config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))

    # Implementations of one optimizer give the same updates: one line per distinct trace, the others named in
    # its legend entry, so that coinciding series are not drawn on top of each other unseen.
    def same(a: list[dict], b: list[dict]) -> bool:  # equal to 0.1%: the implementations differ by rounding
        return len(a) == len(b) and all(abs(x["rare"] - y["rare"]) <= 1e-3 * abs(x["rare"]) for x, y in zip(a, b))

    groups: list[list[str]] = []
    for name, r in results.items():
        group = next((g for g in groups if same(results[g[0]]["trace"], r["trace"])), None)
        (group.append(name) if group else groups.append([name]))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for i, names in enumerate(groups):
        trace = results[names[0]]["trace"]
        marker, ls = styles[i % len(styles)]
        ax.semilogy(
            [t["step"] for t in trace],
            [max(t["rare"], 1e-3) for t in trace],
            marker=marker,
            markevery=max(1, len(trace) // 12),
            ls=ls,
            label=" = ".join(names),
        )
    ax.axvline(config["t_late"], color="k", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("max |Δθ| / lr over rare rows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
