"""bf16 training with AdamNX on MNIST-1D: how far each low-precision setting lands from the float32 run.

Settings: float32; float32 params with bf16 state (``state_dtype=torch.bfloat16``); bf16 params with bf16 state
(pure bf16, the default for bf16 params); bf16 params with float32 state (``state_dtype=torch.float32``); the same
plus ``stochastic_rounding=True``; and stochastic rounding with bf16 state. bf16 moments always round
stochastically (round-to-nearest biases v upwards under AdamNX's 1 − β̂2_t ≈ 1/t). Same data, batches,
initialisation (cast from the float32 init) and lr schedule; several seeds; reports the final training loss (mean
over the last 10% of steps) and test accuracy.

    python benchmarks/low_precision.py [--steps 1400] [--seeds 0 1 2] [--out benchmarks/results/low-precision]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adamnx import AdamNX
from adamnx.bench.models import CNN1D
from adamnx.bench.tasks import get_task, paper_lr_lambda

SETTINGS = {
    "float32": (torch.float32, {}),
    "float32 + bf16 state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "bf16 (pure)": (torch.bfloat16, {}),
    "bf16 + fp32 state": (torch.bfloat16, {"state_dtype": torch.float32}),
    "bf16 + fp32 state + SR": (torch.bfloat16, {"state_dtype": torch.float32, "stochastic_rounding": True}),
    "bf16 + SR": (torch.bfloat16, {"stochastic_rounding": True}),
}


def train(setting: str, seed: int, steps: int, lr: float, batch: int = 100) -> dict:
    dtype, kwargs = SETTINGS[setting]
    splits = get_task("mnist1d").load(None)
    torch.manual_seed(seed)
    model = CNN1D().to(dtype)
    opt = AdamNX(model.parameters(), lr=lr, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, paper_lr_lambda(steps))
    per_epoch = len(splits.x_train) // batch
    losses = []
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        if k == 0:
            perm = torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx = perm[k * batch : (k + 1) * batch]
        loss = torch.nn.functional.cross_entropy(model(splits.x_train[idx].to(dtype)).float(), splits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        acc = (model(splits.x_test.to(dtype)).argmax(-1) == splits.y_test).float().mean().item()
    tail = losses[-max(1, steps // 10) :]
    return {"final_train_loss": sum(tail) / len(tail), "test_accuracy": acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="benchmarks/results/low-precision")
    args = parser.parse_args()
    started = time.time()
    results = {s: [train(s, seed, args.steps, args.lr) for seed in args.seeds] for s in SETTINGS}
    ref = statistics.mean(r["final_train_loss"] for r in results["float32"])
    lines = [
        "# bf16 with AdamNX on MNIST-1D",
        "",
        f"{args.steps} steps, lr {args.lr:g} (paper schedule), seeds {args.seeds}, torch {torch.__version__}, "
        f"{time.time() - started:.0f} s on this machine. Mean ± std over seeds.",
        "",
        "| setting | final train loss | vs float32 | test accuracy % |",
        "|---|---|---|---|",
    ]
    for setting, runs in results.items():
        losses = [r["final_train_loss"] for r in runs]
        accs = [100 * r["test_accuracy"] for r in runs]
        std = statistics.stdev(losses) if len(losses) > 1 else float("nan")
        acc_std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        lines.append(
            f"| {setting} | {statistics.mean(losses):.4f} ± {std:.4f} | {statistics.mean(losses) - ref:+.4f} "
            f"| {statistics.mean(accs):.2f} ± {acc_std:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "low_precision.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    (out / "low_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
