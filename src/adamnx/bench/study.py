"""The horizon study (``adamnx bench --study horizon``): does AdamNX's frozen preconditioner help, hurt or tie?

On one task and run length T, β2 is chosen with :func:`adamnx.beta2_for_horizon` so that T/H takes each value
of ``RATIOS``; at each point AdamNX and AdamW run with the *same* β2 (plus AdamW at its usual β2 = 0.999 as a
reference band), over several seeds. Each run's lr comes from a recorded sweep (one seed, selected on the
validation split) read from a JSON file: the sweep writes it, the study reads it and refuses one made for a
different setup. The study reports the test metric at the validation-selected checkpoint, a Welch t-test and a
paired-by-seed t-test (same seed ⇒ same initialisation and batch order), and a plot against T/H.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from adamnx.bench.config import BenchConfig, ConfigError, to_dict
from adamnx.bench.environment import environment
from adamnx.bench.harness import Prepared, prepare
from adamnx.bench.markdown import figure
from adamnx.bench.optimizers import optimizer_spec, with_beta2
from adamnx.bench.runner import save_json, train_one
from adamnx.bench.tasks import get_task
from adamnx.schedule import beta2_for_horizon, horizon, second_moment_weight

__all__ = [
    "RATIOS",
    "StudyRun",
    "default_sweep_file",
    "horizon_runs",
    "run_study",
    "run_sweep",
    "study_config_overrides",
]

RATIOS = (0.3, 1.0, 3.0, 10.0)  # T/H
SWEEP_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
SWEEP_SEED = 0  # the sweep's seed; the study's seeds are others, so selection never sees the runs it reports
REFERENCE_BETA2 = 0.999  # AdamW's usual β2: the horizontal band
# What the study changes from the task's config: its run length and seeds; no Hessian probe (not studied).
STUDY_OVERRIDES = ["steps=3000", "seeds=[1,2,3,4,5]", "hessian_iters=0", "log_every=50", "threads=1"]


def default_sweep_file(task: str) -> Path:
    """Where the study's recorded sweep for ``task`` lives: beside the harness's own, src/adamnx/bench/sweeps/."""
    from importlib import resources

    return Path(str(resources.files("adamnx.bench") / "sweeps" / f"horizon-{task}.json"))


def study_config_overrides(overrides: list[str]) -> list[str]:
    """The study's defaults, then the user's ``--set`` overrides on top."""
    return [*STUDY_OVERRIDES, *overrides]


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One optimizer setting of the study: a registered optimizer name at one β2 (and T/H, or None: the band)."""

    name: str
    base: str  # "adamnx" or "adamw"
    beta2: float
    ratio: float | None

    def describe(self) -> dict[str, Any]:
        return {"optimizer": self.base, "beta2": self.beta2, "T/H": self.ratio}


def horizon_runs(steps: int, ratios: tuple[float, ...] = RATIOS) -> list[StudyRun]:
    """AdamNX and AdamW at β2 = beta2_for_horizon(steps / ratio) for each ratio, then AdamW at β2 = 0.999."""
    runs = []
    for ratio in ratios:
        beta2 = beta2_for_horizon(steps / ratio)
        runs += [StudyRun(with_beta2(base, beta2), base, beta2, ratio) for base in ("adamnx", "adamw")]
    runs.append(StudyRun(with_beta2("adamw", REFERENCE_BETA2), "adamw", REFERENCE_BETA2, None))
    return runs


def _setup(cfg: BenchConfig, runs: list[StudyRun]) -> dict[str, Any]:
    """What a sweep's learning rates depend on; the study refuses a sweep whose setup differs from its own."""
    return {
        "task": cfg.task,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "schedule": cfg.schedule,
        "eval_every": cfg.eval_every,
        "weight_decay": cfg.weight_decay,
        "runs": {r.name: r.describe() for r in runs},
    }


def _one(cfg: BenchConfig, prepared: Prepared, run: StudyRun, lr: float, seed: int) -> dict[str, Any]:
    one = dataclasses.replace(cfg, optimizers=[run.name], lr={run.name: lr}, seeds=[seed])
    result = train_one(one, prepared.task, prepared.splits, run.name, seed)
    result.update(beta2=run.beta2, ratio=run.ratio, base=run.base)
    result["one_minus_beta2_hat_T"] = second_moment_weight(cfg.steps, run.beta2) if run.base == "adamnx" else None
    dv = [rec["dv_rel"] for rec in result["logs"][-5:] if "dv_rel" in rec]
    result["dv_rel_end"] = sum(dv) / len(dv) if dv else float("nan")
    return result


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, flush=True)


def run_sweep(
    cfg: BenchConfig,
    sweep_file: Path,
    *,
    lrs: tuple[float, ...] = SWEEP_LRS,
    seed: int = SWEEP_SEED,
    ratios: tuple[float, ...] = RATIOS,
    progress: bool = True,
) -> dict[str, Any]:
    """Each study setting at each lr, one seed; the lr with the best validation metric (then loss) is chosen."""
    prepared = prepare(cfg)  # threads, device and data, once for every run
    runs = horizon_runs(cfg.steps, ratios)
    higher = prepared.task.higher_is_better
    table: dict[str, dict[str, dict[str, float]]] = {}
    chosen: dict[str, float] = {}
    seconds = 0.0
    for run in runs:
        table[run.name] = {}
        for lr in lrs:
            r = _one(cfg, prepared, run, lr, seed)
            seconds += r["wall_time_s"]
            best = next((e for e in r["evals"] if e["step"] == r["best_step"]), {})
            table[run.name][f"{lr:g}"] = {
                "val_metric": r["best_val_metric"],
                "val_loss": best.get("val_loss", math.nan),
            }
            _log(f"sweep {run.name} lr {lr:g}: val {r['best_val_metric']:.4f} ({r['wall_time_s']:.1f} s)", progress)

        def score(item: tuple[str, dict[str, float]]) -> tuple[float, float]:
            metric, loss = item[1]["val_metric"], item[1]["val_loss"]
            if not math.isfinite(metric):  # diverged
                return (-math.inf, -math.inf)
            return (metric if higher else -metric, -loss if math.isfinite(loss) else -math.inf)

        chosen[run.name] = float(max(table[run.name].items(), key=score)[0])
        edge = chosen[run.name] in (min(lrs), max(lrs))
        _log(f"  chosen {chosen[run.name]:g}" + (" (an edge of the grid)" if edge else ""), progress)
    record = {
        "what": "learning-rate sweep for `adamnx bench --study horizon` (one seed, best validation metric, "
        "ties broken by validation loss); the study reads chosen_lr from this file",
        "setup": _setup(cfg, runs),
        "seed": seed,
        "lrs": list(lrs),
        "validation": table,
        "chosen_lr": chosen,
        "wall_time_s": seconds,
        "environment": machine_environment(cfg),
    }
    sweep_file.parent.mkdir(parents=True, exist_ok=True)
    save_json(sweep_file, record)
    return record


def read_sweep(sweep_file: Path, cfg: BenchConfig, runs: list[StudyRun]) -> dict[str, float]:
    """The chosen lrs of a recorded sweep, after checking that it was made for this setup."""
    if not sweep_file.is_file():
        raise ConfigError(
            f"no lr sweep at {str(sweep_file)!r}: run `adamnx bench --study horizon --sweep` first "
            "(it writes that file) or pass --sweep-file"
        )
    record = json.loads(sweep_file.read_text())
    setup = _setup(cfg, runs)
    recorded = record.get("setup", {})
    differ = [k for k in setup if recorded.get(k) != json.loads(json.dumps(setup[k]))]
    if differ:
        raise ConfigError(
            f"the sweep in {str(sweep_file)!r} was made for another setup ({', '.join(differ)} differ): "
            "rerun `adamnx bench --study horizon --sweep` with the same --set values"
        )
    return {name: float(lr) for name, lr in record["chosen_lr"].items()}


def machine_environment(cfg: BenchConfig) -> dict[str, Any]:
    """The harness's environment plus what a timing or a result depends on: CPU model, cores, threads."""
    import torch

    env = environment()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        model = ""
    env["cpu model"] = model or env.get("cpu", "unknown")
    env["cpu cores (os.cpu_count)"] = os.cpu_count()
    env["cpu cores available"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env["torch threads"] = cfg.threads if cfg.threads > 0 else torch.get_num_threads()
    return env


def _pvalues(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """(Welch p, paired-by-seed p), two-sided; nan when it cannot be computed."""
    import warnings

    import numpy as np
    from scipy import stats

    xa = [v for v in a.values() if math.isfinite(v)]
    xb = [v for v in b.values() if math.isfinite(v)]
    shared = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    diffs = [a[s] - b[s] for s in shared]
    with warnings.catch_warnings():  # scipy warns on nearly identical samples; the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        welch = (
            float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
            if len(xa) > 1 and len(xb) > 1 and (np.std(xa) > 0 or np.std(xb) > 0)
            else math.nan
        )
        paired = (
            float(stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared]).pvalue)
            if len(shared) > 1 and np.std(diffs) > 0
            else math.nan
        )
    return welch, paired


def _stats(values: dict[int, float]) -> tuple[float, float]:
    import numpy as np

    finite = [v for v in values.values() if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def summarize_study(cfg: BenchConfig, runs: list[StudyRun], results: list[dict]) -> dict[str, Any]:
    """Per T/H point: each optimizer's mean ± std, AdamNX − AdamW(β2) with its Welch and paired p-values."""
    by_name = {
        r.name: {res["seed"]: res["test_at_best_val"] for res in results if res["optimizer"] == r.name} for r in runs
    }
    final = {
        r.name: {res["seed"]: res["final_test_metric"] for res in results if res["optimizer"] == r.name} for r in runs
    }
    lrs = {res["optimizer"]: res["lr"] for res in results}
    dv = {
        r.name: _stats({res["seed"]: res["dv_rel_end"] for res in results if res["optimizer"] == r.name})[0]
        for r in runs
    }
    band = next(r for r in runs if r.ratio is None)
    points = []
    for ratio in sorted({r.ratio for r in runs if r.ratio is not None}):
        nx = next(r for r in runs if r.ratio == ratio and r.base == "adamnx")
        w = next(r for r in runs if r.ratio == ratio and r.base == "adamw")
        row: dict[str, Any] = {"T/H": ratio, "beta2": nx.beta2, "H": horizon(nx.beta2)}
        for key, run in (("adamnx", nx), ("adamw", w)):
            row[f"{key}_mean"], row[f"{key}_std"] = _stats(by_name[run.name])
            row[f"{key}_final_mean"], _ = _stats(final[run.name])
            row[f"{key}_lr"] = lrs.get(run.name, math.nan)
            row[f"{key}_dv_rel_end"] = dv[run.name]
        row["one_minus_beta2_hat_T"] = second_moment_weight(cfg.steps, nx.beta2)
        row["diff_mean"] = row["adamnx_mean"] - row["adamw_mean"]
        row["p_welch"], row["p_paired"] = _pvalues(by_name[nx.name], by_name[w.name])
        row["p_welch_vs_band"], row["p_paired_vs_band"] = _pvalues(by_name[nx.name], by_name[band.name])
        points.append(row)
    band_mean, band_std = _stats(by_name[band.name])
    task = get_task(cfg.task)
    return {
        "task": cfg.task,
        "metric": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "steps": cfg.steps,
        "seeds": cfg.seeds,
        "points": points,
        "band": {"beta2": band.beta2, "mean": band_mean, "std": band_std, "lr": lrs.get(band.name, math.nan)},
        "wall_time_s": float(sum(r["wall_time_s"] for r in results)),
    }


def _scale(summary: dict) -> tuple[float, str, int]:
    if summary["metric"] == "accuracy":
        return 100.0, "test accuracy (%)", 2
    return 1.0, f"test {summary['metric']}", 4


def _p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.3f}"


def study_table(summary: dict) -> str:
    scale, label, digits = _scale(summary)

    def ms(mean: float, std: float) -> str:
        return (
            f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
            if math.isfinite(std)
            else f"{mean * scale:.{digits}f}"
        )

    header = [
        "T/H",
        "β2",
        "H",
        "1 − β̂2_T",
        f"AdamNX {label}",
        f"AdamW(β2) {label}",
        "AdamNX − AdamW",
        "Welch p",
        "paired p",
        "lr NX / W",
        "AdamNX vs AdamW(0.999): paired p",
        "‖Δv‖/‖v‖ at T, NX / W",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["points"]:
        cells = [
            f"{row['T/H']:g}",
            f"{row['beta2']:.4f}",
            f"{row['H']:,.0f}",
            f"{row['one_minus_beta2_hat_T']:.1e}",
            ms(row["adamnx_mean"], row["adamnx_std"]),
            ms(row["adamw_mean"], row["adamw_std"]),
            f"{row['diff_mean'] * scale:+.{digits}f}",
            _p(row["p_welch"]),
            _p(row["p_paired"]),
            f"{row['adamnx_lr']:g} / {row['adamw_lr']:g}",
            _p(row["p_paired_vs_band"]),
            f"{row['adamnx_dv_rel_end']:.1e} / {row['adamw_dv_rel_end']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    band = summary["band"]
    lines.append("")
    lines.append(
        f"AdamW at its usual betas (0.9, {band['beta2']}) (lr {band['lr']:g}): {ms(band['mean'], band['std'])} "
        f"({label}; the plot's horizontal band)."
    )
    return "\n".join(lines)


def write_plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, label, _ = _scale(summary)
    points = summary["points"]
    ratios = [p["T/H"] for p in points]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    band = summary["band"]
    lo, hi = (band["mean"] - band["std"]) * scale, (band["mean"] + band["std"]) * scale
    ax.axhspan(lo, hi, color="0.85", label=f"AdamW β2 = {band['beta2']} (mean ± std)")
    ax.axhline(band["mean"] * scale, color="0.5", lw=1)
    for key, name, marker, color, shift in (
        ("adamnx", "AdamNX", "o", "C3", 0.94),
        ("adamw", "AdamW, same β2", "s", "C0", 1.06),
    ):
        ax.errorbar(
            [r * shift for r in ratios],
            [p[f"{key}_mean"] * scale for p in points],
            yerr=[p[f"{key}_std"] * scale for p in points],
            marker=marker,
            ms=8,
            capsize=5,
            lw=1.5,
            color=color,
            mfc="white" if key == "adamw" else color,
            mew=2,
            label=f"{name} (mean ± std)",
        )
    ax.set_xscale("log")
    ax.set_xticks(ratios)
    ax.set_xticklabels([f"{p['T/H']:g}\nβ2={p['beta2']:.4f}" for p in points])
    ax.minorticks_off()
    ax.set_xlabel(f"T / H  (T = {summary['steps']:,} steps; H = horizon of β2)")
    ax.set_ylabel(label)
    ax.axvline(1.0, color="k", ls=":", lw=1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    ax.set_title(
        f"{summary['task']}: {label} at the validation-selected checkpoint, {len(summary['seeds'])} seeds", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(
    cfg: BenchConfig,
    sweep_file: Path,
    out_dir: Path,
    *,
    ratios: tuple[float, ...] = RATIOS,
    progress: bool = True,
) -> dict[str, Any]:
    """Every study setting × seed at its swept lr (resumable: finished runs are kept), then table and plot."""
    runs = horizon_runs(cfg.steps, ratios)
    chosen = read_sweep(sweep_file, cfg, runs)
    prepared = prepare(cfg)  # threads, device and data, once for every run, before a folder is made
    if SWEEP_SEED in cfg.seeds:
        _log(f"note: seed {SWEEP_SEED} is also the sweep's seed", progress)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    save_json(out_dir / "config.json", {**to_dict(cfg), "ratios": list(ratios), "sweep_file": str(sweep_file)})
    env = machine_environment(cfg)
    save_json(out_dir / "environment.json", env)
    results = []
    for run in runs:
        for seed in cfg.seeds:
            path = out_dir / "runs" / f"{run.name}-seed{seed}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
                continue
            result = _one(cfg, prepared, run, chosen[run.name], seed)
            _log(
                f"{run.name} seed {seed}: test {result['test_at_best_val']:.4f} ({result['wall_time_s']:.1f} s)",
                progress,
            )
            save_json(path, {k: v for k, v in result.items() if k != "logs"})
            results.append(result)
    summary = summarize_study(cfg, runs, results)
    summary["environment"] = env
    summary["constructors"] = {r.name: optimizer_spec(r.name).constructor for r in runs}
    save_json(out_dir / "summary.json", summary)
    write_plot(out_dir / "horizon.png", summary)
    (out_dir / "report.md").write_text(_report(cfg, summary, sweep_file))
    return summary


def _report(cfg: BenchConfig, summary: dict, sweep_file: Path) -> str:
    env = summary["environment"]
    direction = "higher" if summary["higher_is_better"] else "lower"
    ratios = ", ".join(f"{p['T/H']:g}" for p in summary["points"])
    with contextlib.suppress(ValueError):
        sweep_file = sweep_file.resolve().relative_to(Path.cwd())
    constructors = "\n".join(f"- `{name}`: `{call}`" for name, call in summary["constructors"].items())
    return f"""# Horizon study — {summary["task"]}, T = {cfg.steps:,} steps

β2 chosen with `adamnx.beta2_for_horizon(T / ratio)` so that T/H ∈ {{{ratios}}}.
AdamNX and AdamW run with the same betas (0.9, β2) at each point; AdamW at (0.9, 0.999) is the reference band.
{len(cfg.seeds)} seeds ({", ".join(map(str, cfg.seeds))}); a seed fixes the initialisation and the batch order, so runs
with the same seed are paired. Batch {cfg.batch_size}, schedule `{cfg.schedule}`, weight decay 0.01 (both), evaluation
every {cfg.eval_every} steps. Each run's checkpoint is selected on the **validation** split and the **test** metric
({direction} is better) is reported there; mean ± std over seeds. p: two-sided Welch t-test and paired t-test
(by seed), scipy. Learning rates: from the sweep in `{sweep_file.as_posix()}` (one seed, {SWEEP_SEED}, not among the
study's; selected on validation). Total training time {summary["wall_time_s"] / 60:.1f} min (the sweep excluded).

{study_table(summary)}

1 − β̂2_T: AdamNX's second-moment weight at the last step (≈ 1/T before the horizon, vanishing after it).
‖Δv‖/‖v‖: relative change of the second moment per step, averaged over the last measurements.

{figure("horizon.png", "test metric vs T/H")}

## Exact optimizers

{constructors}

## Environment

{chr(10).join(f"- {k}: {v}" for k, v in env.items())}
"""
