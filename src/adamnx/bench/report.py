"""One task's report: aggregation across seeds, significance tests, the paper's claims, plots and report.md.

Order: the verdict (AdamNX against each optimizer), then the mechanism (horizon, ‖Δv‖/‖v‖), then stability
and flatness. Every number about β̂2 comes from the β2 the AdamNX runs were configured with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from adamnx.bench import registry
from adamnx.bench.config import BenchConfig
from adamnx.bench.markdown import figure
from adamnx.bench.optimizers import DECAY_RULES, adamnx_beta2
from adamnx.bench.registry import COMPACT_VARIANTS, REFERENCE, display_name
from adamnx.bench.stats import mean_std
from adamnx.bench.tasks import Task
from adamnx.schedule import horizon, second_moment_weight

__all__ = ["summarize", "summary_table", "write_report"]

SMOKE_BANNER = "**Smoke run: too short for conclusions.** No verdicts are drawn from it; run `adamnx bench` for them."


def _welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided Welch t-test p-value (nan when it cannot be computed: < 2 seeds or no variance)."""
    import warnings

    from scipy import stats

    a = [v for v in a if math.isfinite(v)]
    b = [v for v in b if math.isfinite(v)]
    if len(a) < 2 or len(b) < 2 or (np.std(a) == 0 and np.std(b) == 0):
        return float("nan")
    with warnings.catch_warnings():  # scipy warns when the samples are nearly identical; the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _reference(cfg: BenchConfig, framework: str) -> str | None:
    """The AdamNX row that the other rows of ``framework`` are compared with."""
    return next((name for name in REFERENCE if name in cfg.optimizers), None)


def _row(cfg: BenchConfig, runs: list[dict], ref_values: list[float] | None, is_ref: bool) -> dict[str, Any]:
    first = runs[0]
    test = [r["test_at_best_val"] for r in runs]
    row = {
        "optimizer": first["optimizer"],
        "framework": first["framework"],
        "name": display_name(first["optimizer"], first["framework"], len(cfg.frameworks())),
        "lr": first["lr"],
        "seeds": len(runs),
        "constructor": first["constructor"],
    }
    row["test_mean"], row["test_std"] = mean_std(test)
    row["val_mean"], row["val_std"] = mean_std([r["best_val_metric"] for r in runs])
    row["p_vs_adamnx"] = float("nan") if is_ref or ref_values is None else _welch_p(test, ref_values)
    row["val_loss_std_last20"], _ = mean_std([r["val_loss_std_last20"] for r in runs])
    row["update_norm_cv_last20"], _ = mean_std([r["update_norm_cv_last20"] for r in runs])
    row["hessian_mean"], row["hessian_std"] = mean_std([r["hessian_top_eigenvalue"] for r in runs])
    row["diverged"] = sum(bool(r["diverged"]) for r in runs)
    row["wall_time_s"] = float(sum(r["wall_time_s"] for r in runs))
    row["reference"] = is_ref
    return row


def summarize(cfg: BenchConfig, task: Task, results: list[dict]) -> dict[str, Any]:
    def runs_of(optimizer: str, framework: str) -> list[dict]:
        return [r for r in results if r["optimizer"] == optimizer and r["framework"] == framework]

    rows = []
    for optimizer, framework in cfg.runs():
        runs = runs_of(optimizer, framework)
        if not runs:
            continue
        ref = _reference(cfg, framework)
        ref_runs = runs_of(ref, framework) if ref else []
        ref_values = [r["test_at_best_val"] for r in ref_runs] if ref_runs else None
        rows.append(_row(cfg, runs, ref_values, optimizer == ref))
    return {"task": task.name, "metric": task.metric_name, "higher_is_better": task.higher_is_better, "rows": rows}


_PLOT_TITLES = {
    "curves.png": "training loss, validation loss and the test metric",
    "beta2_hat.png": "1 − β̂2_t and ‖Δv‖/‖v‖ per step",
    "stability.png": "the test metric and late-training stability",
}


def _fmt(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if math.isfinite(std) else "")


def _metric_scale(summary: dict) -> tuple[float, str]:
    return (100.0 if summary["metric"] == "accuracy" else 1.0), registry.METRIC_LABELS.get(
        summary["metric"], f"test {summary['metric']}"
    )


def _fmt_test(row: dict, summary: dict) -> str:
    scale, _ = _metric_scale(summary)
    return _fmt(row["test_mean"], row["test_std"], scale, 2 if scale > 1 else 4)


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    _, label = _metric_scale(summary)
    header = ["optimizer", "lr", label, "p vs AdamNX", "val-loss std†", "update CV†", "Hessian λmax"]
    rows = []
    for row in summary["rows"]:
        p = row["p_vs_adamnx"]
        rows.append(
            [
                row["name"],
                f"{row['lr']:.0e}",
                _fmt_test(row, summary),
                "—" if not math.isfinite(p) else f"{p:.3f}",
                f"{row['val_loss_std_last20']:.2e}" if math.isfinite(row["val_loss_std_last20"]) else "n/a",
                f"{row['update_norm_cv_last20']:.3f}" if math.isfinite(row["update_norm_cv_last20"]) else "n/a",
                _fmt(row["hessian_mean"], row["hessian_std"], 1.0, 3),
            ]
        )
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --- the claims: each returns one paragraph (without its number) or None when this run cannot speak to it ---


def _by_framework(summary: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in summary["rows"]:
        groups.setdefault(row["framework"], []).append(row)
    return groups


def _verdict_claim(cfg: BenchConfig, summary: dict) -> str | None:
    """AdamNX against each optimizer: beats / ties / loses, with the Welch p-value."""
    _, label = _metric_scale(summary)
    better = (lambda a, b: a > b) if summary["higher_is_better"] else (lambda a, b: a < b)
    parts = []
    for rows in _by_framework(summary).values():
        ref = next((r for r in rows if r["reference"]), None)
        if ref is None or ref["optimizer"] != "adamnx":
            continue
        for row in rows:
            if row is ref or row["optimizer"] in COMPACT_VARIANTS:  # those have their own claim
                continue
            p = row["p_vs_adamnx"]
            if not math.isfinite(p):
                parts.append(f"vs {row['name']}: no test (too few finite runs)")
                continue
            ahead = better(ref["test_mean"], row["test_mean"])
            word = ("beats" if ahead else "loses to") if p < 0.05 else f"ties ({'ahead of' if ahead else 'behind'})"
            parts.append(f"{word} {row['name']} ({_p(p)})")
    if not parts:
        return None
    return (
        f"**Outperforms Adam and variants?** ({label} at the checkpoint selected on validation, {len(cfg.seeds)} "
        "seeds, Welch t-test, 'beats'/'loses to' at p < 0.05): AdamNX " + "; ".join(parts) + ". With so few seeds "
        "a test only detects large effects: 'ties' means no evidence either way, not equality."
    )


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def compact_state_differences(results: list[dict], framework: str = "torch") -> dict[str, dict[str, Any]]:
    """Each compact-state variant (bf16 or 8-bit moments) against float32 AdamNX, seed by seed (the same init and
    batches): the paired differences of the test metric, their mean, std and two-sided paired t-test p-value."""
    from scipy import stats

    def by_seed(optimizer: str) -> dict[int, float]:
        return {
            r["seed"]: r["test_at_best_val"]
            for r in results
            if r["optimizer"] == optimizer and r["framework"] == framework and math.isfinite(r["test_at_best_val"])
        }

    reference = by_seed("adamnx")
    out = {}
    for variant in COMPACT_VARIANTS:
        values = by_seed(variant)
        seeds = sorted(set(values) & set(reference))
        if not seeds:
            continue
        diffs = [values[s] - reference[s] for s in seeds]
        p = float("nan")
        if len(diffs) >= 2 and np.std(diffs) > 0:
            p = float(stats.ttest_rel([values[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
        out[variant] = {"seeds": seeds, "differences": diffs, "mean": float(np.mean(diffs)),
                        "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan"), "p_paired": p}  # fmt: skip
    return out


def _compact_state_claim(cfg: BenchConfig, summary: dict, results: list[dict]) -> str | None:
    """bf16 and 8-bit moments against float32 AdamNX: the paired difference and its p-value."""
    found = compact_state_differences(results)
    if not found:
        return None
    _, label = _metric_scale(summary)
    scale = 100.0 if summary["metric"] == "accuracy" else 1.0
    parts = []
    for variant, d in found.items():
        verdict = "a difference" if d["p_paired"] < 0.05 else "no detectable difference"
        spread = f" ± {scale * d['std']:.3g}" if math.isfinite(d["std"]) else ""
        p = _p(d["p_paired"]) if math.isfinite(d["p_paired"]) else "no test"
        parts.append(
            f"{display_name(variant)} − AdamNX = {scale * d['mean']:+.3g}{spread} over seeds {d['seeds']} "
            f"(paired t-test, {p}: {verdict})"
        )
    return (
        f"**Compact state costs accuracy?** ({label}, the same lr, init and batches as float32 AdamNX, seed by seed) "
        + "; ".join(parts)
        + ". With a few seeds only a large effect would show: 'no detectable difference' is not equality."
    )


def _final_dv(results: list[dict], optimizer: str) -> list[float]:
    """‖Δv‖/‖v‖ over the last 10 measurements of every seed of ``optimizer``."""
    values = [rec.get("dv_rel") for r in results if r["optimizer"] == optimizer for rec in r["logs"][-10:]]
    return [v for v in values if v is not None and math.isfinite(v)]


def _mechanism_claim(cfg: BenchConfig, results: list[dict]) -> str | None:
    """β̂2 → 1: whether the run passed AdamNX's horizon, for the β2 it was configured with."""
    ref = _reference(cfg, "torch")
    beta2 = adamnx_beta2(ref) if ref else None
    if beta2 is None:
        return None
    h = horizon(beta2)
    w_end = second_moment_weight(cfg.steps, beta2)
    if cfg.steps < h:
        return (
            f"**β̂2 → 1 (degrades to momentum SGD)?** This run stops at t = {cfg.steps:,}, before the horizon "
            f"H ≈ {h:,.0f} steps of β2 = {beta2:g}: 1 − β̂2_t only fell to {w_end:.2e} (1/t = {1 / cfg.steps:.2e}), "
            "so v_t stayed close to the plain mean of all g² and AdamNX did **not** become momentum SGD here. "
            "The claim is untested by this run"
            + (" (the default quadratic task runs past H)." if cfg.task != "quadratic" else ".")
        )
    dv = _final_dv(results, ref)
    adam_dv = _final_dv(results, "adam") or _final_dv(results, "rule-adam")
    contrast = f" (Adam's: {np.mean(adam_dv):.1e})" if adam_dv else ""
    moved = f" and ‖Δv‖/‖v‖ per step to {np.mean(dv):.1e}{contrast}" if dv else ""
    return (
        f"**β̂2 → 1 (degrades to momentum SGD)?** The run reaches t = {cfg.steps:,} = {cfg.steps / h:.1f} H "
        f"(H ≈ {h:,.0f} steps for β2 = {beta2:g}); 1 − β̂2_t fell to {w_end:.2e}{moved} at the end: v has "
        "effectively frozen and AdamNX acts as momentum SGD with a fixed per-coordinate preconditioner "
        "(beta2_hat.png)."
    )


def _ranking(values: dict[str, float], ref: str) -> tuple[list[str], int]:
    ranked = sorted(values, key=values.get)
    return ranked, ranked.index(ref) + 1


def _stability_claim(summary: dict) -> str | None:
    rows = {r["name"]: r for r in summary["rows"] if r["framework"] == summary["rows"][0]["framework"]}
    ref = next((n for n, r in rows.items() if r["reference"]), None)
    stab = {n: r["val_loss_std_last20"] for n, r in rows.items() if math.isfinite(r["val_loss_std_last20"])}
    if ref not in stab or len(stab) < 2:
        return None
    ranked, rank = _ranking(stab, ref)
    return (
        "**More stable late in training?** Std of the validation loss over the last 20% of evaluations: "
        + ", ".join(f"{n} {stab[n]:.2e}" for n in ranked)
        + f". {ref} ranks {rank} of {len(ranked)} (lower is steadier)."
    )


def _within_noise(rows: dict, ranked: list[str]) -> bool:
    best, worst = rows[ranked[0]], rows[ranked[-1]]
    spread = abs(best["test_mean"] - worst["test_mean"])
    noise = max(best["test_std"], worst["test_std"])
    return math.isfinite(noise) and spread <= noise


def _ablation_claim(summary: dict) -> str | None:
    rows = {r["name"]: r for r in summary["rows"] if r["optimizer"].startswith("rule-")}
    ref = next((n for n, r in rows.items() if r["optimizer"] == "rule-adamnx"), None)
    if len(rows) < 2 or ref is None:
        return None
    scale, _ = _metric_scale(summary)
    ranked = sorted(rows, key=lambda n: rows[n]["test_mean"], reverse=summary["higher_is_better"])
    return (
        "**Does its decay rate beat the others?** (only the β̂2 rule differs): "
        + ", ".join(f"{n} {_fmt(rows[n]['test_mean'], rows[n]['test_std'], scale)}" for n in ranked)
        + f". {ref} ranks {ranked.index(ref) + 1} of {len(ranked)}"
        + (": the differences are within one std." if _within_noise(rows, ranked) else ".")
    )


def _flatness_claim(summary: dict) -> str | None:
    rows = {r["name"]: r for r in summary["rows"] if r["framework"] == summary["rows"][0]["framework"]}
    ref = next((n for n, r in rows.items() if r["reference"]), None)
    hess = {n: r["hessian_mean"] for n, r in rows.items() if math.isfinite(r["hessian_mean"])}
    if ref not in hess or len(hess) < 2:
        return None
    if max(hess.values()) - min(hess.values()) <= 1e-6 * max(hess.values()):
        return (
            f"**Flatter minima?** Not testable here: the loss is quadratic, so its Hessian (top eigenvalue "
            f"{hess[ref]:.3g}) is the same at every weight."
        )
    ranked, rank = _ranking(hess, ref)
    return (
        "**Flatter minima?** Top Hessian eigenvalue of the training loss at the final weights: "
        + ", ".join(f"{n} {hess[n]:.3g}" for n in ranked)
        + f". {ref} ranks {rank} of {len(ranked)} (lower is flatter). Sharpness is not scale-invariant (weight "
        "decay changes it), so read this as a description, not a cause of generalisation."
    )


def claims(cfg: BenchConfig, summary: dict, results: list[dict]) -> list[str]:
    """The numbered claims: verdict first, then mechanism, stability, the ablation and flatness (none if quick)."""
    if cfg.quick:
        return []
    found = [
        _verdict_claim(cfg, summary),
        _mechanism_claim(cfg, results),
        _stability_claim(summary),
        _ablation_claim(summary),
        _flatness_claim(summary),
        _compact_state_claim(cfg, summary, results),
    ]
    return [f"{i}. {text}" for i, text in enumerate((c for c in found if c), start=1)]


# --- plots ---

_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P")]


def _style(i: int) -> dict[str, Any]:
    """Series that coincide stay distinguishable: each has its own dash pattern and marker."""
    ls, marker = _STYLES[i % len(_STYLES)]
    return {"ls": ls, "marker": marker, "markersize": 4, "color": f"C{i % 10}"}


def _band(ax, steps, values, label: str, style: dict, log: bool) -> None:
    """Mean line; band: ±std on a linear axis, the min–max over seeds on a log axis (never below 0)."""
    arr = np.array(values, dtype=float)
    if not np.isfinite(arr).any():
        return
    if log:
        centre, low, high = np.nanmedian(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0)
    else:
        centre = np.nanmean(arr, 0)
        spread = np.nanstd(arr, 0)
        low, high = centre - spread, centre + spread
    ax.plot(steps, centre, label=label, markevery=max(1, len(steps) // 8), **style)
    ax.fill_between(steps, low, high, alpha=0.15, color=style["color"], lw=0)


def _series(results: list[dict], optimizer: str, framework: str, source: str, key: str):
    runs = [r for r in results if r["optimizer"] == optimizer and r["framework"] == framework and r[source]]
    if not runs:
        return [], []
    length = min(len(r[source]) for r in runs)
    steps = [e["step"] for e in runs[0][source][:length]]
    return steps, [[float(e.get(key, float("nan"))) for e in r[source][:length]] for r in runs]


def _names(cfg: BenchConfig) -> list[tuple[str, str, str]]:
    return [(o, f, display_name(o, f, len(cfg.frameworks()))) for o, f in cfg.runs()]


def _curves_plot(plt, out_dir: Path, cfg: BenchConfig, summary: dict, results: list[dict]) -> str:
    scale, label = _metric_scale(summary)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        (axes[0], "logs", "train_loss", "train loss (minibatch)", True),
        (axes[1], "evals", "val_loss", "validation loss", True),
        (axes[2], "evals", "test_metric", label, False),
    )
    for i, (optimizer, framework, name) in enumerate(_names(cfg)):
        for ax, source, key, ylabel, log in panels:
            steps, values = _series(results, optimizer, framework, source, key)
            if steps:
                values = [[v * scale for v in row] for row in values] if key == "test_metric" else values
                _band(ax, steps, values, name, _style(i), log)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
    for ax, *_, log in panels:
        if log:
            ax.set_yscale("log")
    axes[0].set_title("median, band: min–max over seeds", fontsize=9)
    axes[1].set_title("median, band: min–max over seeds", fontsize=9)
    axes[2].set_title("mean ± std over seeds", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{summary['task']}: {len(cfg.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=90)
    plt.close(fig)
    return "curves.png"


def _beta2_plot(plt, out_dir: Path, cfg: BenchConfig, results: list[dict]) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    t = np.unique(np.geomspace(1, max(cfg.steps, 2), 400).astype(int)).astype(float)
    for i, (fn, beta2, desc) in enumerate(DECAY_RULES.values()):
        style = {**_style(i), "markevery": (i * 7, 45)}  # staggered markers: coinciding rules stay visible
        axes[0].loglog(
            t, [fn(s, beta2) for s in t], label=desc.split(":")[0] + (f", β2 = {beta2:g}" if beta2 else ""), **style
        )
    ref = _reference(cfg, "torch")
    beta2 = adamnx_beta2(ref) if ref else None
    h = horizon(beta2) if beta2 is not None else None
    if h is not None:
        axes[0].axvline(h, color="k", ls="--", lw=1, label=f"AdamNX horizon H ≈ {h:,.0f} (β2 = {beta2:g})")
    axes[0].set_xlabel("step t")
    axes[0].set_ylabel("1 − β̂2_t")
    axes[0].legend(fontsize=8, title="AdaX ≈ AdamNX; both ≈ 1/t for t ≪ H", title_fontsize=8)
    drawn = False
    for i, (optimizer, framework, name) in enumerate(_names(cfg)):
        steps, values = _series(results, optimizer, framework, "logs", "dv_rel")
        if steps and np.isfinite(np.array(values, dtype=float)).any():
            _band(axes[1], steps, values, name, _style(i), log=True)
            drawn = True
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("‖Δv‖ / ‖v‖ per step")
    axes[1].set_title("median, band: min–max over seeds", fontsize=9)
    if h is not None and cfg.steps >= h:
        axes[1].axvline(h, color="k", ls="--", lw=1)
    if drawn:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "beta2_hat.png", dpi=90)
    plt.close(fig)
    return "beta2_hat.png"


def _stability_plot(plt, out_dir: Path, summary: dict) -> str:
    """Dots (± std where there is one) on axes fitted to the values: 1% differences stay visible."""
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    scale, label = _metric_scale(summary)
    rows = summary["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 1.5 + 0.5 * len(rows)))
    panels = (
        (axes[0], "test_mean", "test_std", label + " (mean ± std)", scale),
        (axes[1], "val_loss_std_last20", None, "val-loss std, last 20% (lower = steadier)", 1.0),
        (axes[2], "update_norm_cv_last20", None, "update-norm CV, last 20% (lower = steadier)", 1.0),
    )
    y = np.arange(len(rows))
    for ax, key, err, title, factor in panels:
        values = np.array([r[key] * factor for r in rows], dtype=float)
        errors = np.array([r[err] * factor for r in rows], dtype=float) if err else None
        colors = ["C3" if r["reference"] else "C0" for r in rows]
        ax.errorbar(values, y, xerr=errors, fmt="none", ecolor="0.5", capsize=4)
        ax.scatter(values, y, c=colors, s=40, zorder=3)
        ax.set_yticks(y, [r["name"] for r in rows])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        finite = np.isfinite(values)
        if finite.any():
            margin = np.nan_to_num(errors[finite]) if errors is not None else 0.0
            lo, hi = (values[finite] - margin).min(), (values[finite] + margin).max()
            span = max(hi - lo, 0.02 * abs(hi))  # fitted to the values, not from 0; no zoom into ulps either
            ax.set_xlim(lo - 0.1 * span, hi + 0.1 * span)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    fig.tight_layout()
    fig.savefig(out_dir / "stability.png", dpi=90)
    plt.close(fig)
    return "stability.png"


def write_plots(out_dir: Path, cfg: BenchConfig, summary: dict, results: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return [
        _curves_plot(plt, out_dir, cfg, summary, results),
        _beta2_plot(plt, out_dir, cfg, results),
        _stability_plot(plt, out_dir, summary),
    ]


# --- report.md ---


def _setup(cfg: BenchConfig, task: Task, env: dict) -> str:
    processes = env.get("processes", 1)
    schedule = (
        " (linear decay to 1% of lr over the first 60% of steps, then constant)" if cfg.schedule == "paper" else ""
    )
    return (
        f"{task.description}. {len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))}), {cfg.steps:,} steps, batch "
        f"{cfg.batch_size} ({processes} {'processes, data parallel (DDP)' if processes > 1 else 'process'}, "
        f"{env.get('torch threads', '?')} torch thread{'s' if env.get('torch threads') != 1 else ''} each), "
        f"schedule `{cfg.schedule}`{schedule}.\n"
        f"The checkpoint of each run is **selected on the validation split** (evaluated every {cfg.eval_every} "
        "steps) and the **test** metric is reported at that checkpoint; mean ± std over seeds; p: two-sided Welch "
        "t-test against AdamNX (of the same framework)."
    )


def _tuning(cfg: BenchConfig, task: Task, summary: dict) -> str:
    constructors = "\n".join(f"- {r['name']} (lr {r['lr']:g}): `{r['constructor']}`" for r in summary["rows"])
    return f"""{constructors}

Learning rates: the recorded sweep `src/adamnx/bench/sweeps/{task.name}.json` where the task has one (else the
task's config), chosen over {", ".join(f"{x:g}" for x in cfg.sweep_lrs)} with one seed, selecting on validation
(`adamnx bench --sweep`). Every optimizer got the same budget; no other hyperparameter was tuned. The ablation's
rules run at AdamNX's lr."""


def write_report(out_dir: Path, cfg: BenchConfig, task: Task, results: list[dict], env: dict) -> dict:
    summary = summarize(cfg, task, results)
    plots = write_plots(out_dir, cfg, summary, results)
    header, rows = summary_table(summary)
    numbered = claims(cfg, summary, results)
    if cfg.quick:
        findings = "None drawn: this is a smoke run (see the banner above)."
    else:
        findings = "\n".join(numbered) or "(no AdamNX run in this report)"
    diverged = ", ".join(f"{r['name']} {r['diverged']}" for r in summary["rows"] if r["diverged"]) or "none"
    banner = f"> {SMOKE_BANNER}\n\n" if cfg.quick else ""
    text = f"""# adamnx bench — {task.name}

{banner}{_setup(cfg, task, env)}

## What the numbers say about the paper's claims

{findings}

## Results

{_markdown_table(header, rows)}

† over the last 20% of training: std of the validation loss across evaluations, and coefficient of variation
of the update norm ‖θ_t − θ_(t−1)‖ (lower = steadier). Hessian λmax: top eigenvalue of the training-loss Hessian
at the final weights (power iteration on Hessian-vector products; lower = flatter).

Diverged runs: {diverged}.

## Exact optimizers and tuning budget

{_tuning(cfg, task, summary)}

## Environment

{chr(10).join(f"- {k}: {v}" for k, v in env.items())}

## Plots

{(chr(10) * 2).join(figure(p, _PLOT_TITLES.get(p, p)) for p in plots)}

Raw data: `metrics.jsonl`, `results.json`, `config.json`.
"""
    (out_dir / "report.md").write_text(text)
    return summary
