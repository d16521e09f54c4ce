"""How many torch threads the harness's small tasks need, on an idle machine and next to a busy process.

Each measurement is a fresh process that sets its intra-op threads before torch first runs anything, then trains
one of the default bench's models for ``--steps`` steps (AdamNX, no evaluation) and prints the wall time. "busy"
starts a pure-Python busy loop (one core) next to it for the whole measurement. Run it alone on the machine
(``flock /tmp/adamnx-heavy.lock python benchmarks/threads.py``): other jobs are exactly what it measures.

Writes threads.json and threads.md to ``--out`` (default benchmarks/results/threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

_CHILD = """
import sys, time
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads({threads})
from adamnx.bench.config import load_config
from adamnx.bench.tasks import get_task
from adamnx.bench.runner import train_one
cfg = load_config({task!r}, ["steps={steps}", "eval_every={steps}", "hessian_iters=0", "optimizers=['adamnx']"])
task = get_task(cfg.task)
splits = task.load(cfg)
start = time.perf_counter()
train_one(cfg, task, splits, "adamnx", 0)
print(time.perf_counter() - start)
"""


def measure(task: str, threads: int, policy: str, steps: int, timeout: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    code = _CHILD.format(src=SRC, threads=threads, task=task, steps=steps)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf")
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    sys.path.insert(0, SRC)
    from adamnx.bench.environment import environment

    return {**environment(), "load average before": os.getloadavg()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist1d,digits,quadratic")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--policies", default="default,passive", help="OMP_WAIT_POLICY values (default: unset)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds; a slower run is recorded as inf")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "threads"))
    args = parser.parse_args()
    info = machine()
    rows = []
    for load in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
        try:
            for task in args.tasks.split(","):
                for threads in map(int, args.threads.split(",")):
                    for policy in args.policies.split(","):
                        times = [measure(task, threads, policy, args.steps, args.timeout) for _ in range(args.reps)]
                        row = {"load": load, "task": task, "threads": threads, "omp_wait_policy": policy}
                        row |= {"times_s": times, "median_s": statistics.median(times), "max_s": max(times)}
                        rows.append(row)
                        print(
                            f"{load:4s} {task:9s} threads={threads} OMP_WAIT_POLICY={policy:8s} "
                            + " ".join(f"{t:.2f}" for t in times),
                            flush=True,
                        )
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "reps": args.reps, "timeout_s": args.timeout}
    (out / "threads.json").write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=1))
    lines = [
        "# Torch threads for the harness's small tasks",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        f"Wall time of {args.steps} AdamNX training steps (no evaluation), {args.reps} fresh processes each; "
        "busy = a pure-Python busy loop on one core at the same time. inf: over the timeout.",
        "",
        "| load | task | threads | OMP_WAIT_POLICY | median s | max s | all s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']} | {r['task']} | {r['threads']} | {r['omp_wait_policy']} | {r['median_s']:.2f} "
            f"| {r['max_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['times_s'])} |"
        )
    (out / "threads.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'threads.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
