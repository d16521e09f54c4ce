"""Start test workers under torchrun on this machine: one "node" (--standalone) or several (one torchrun each)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def worker_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]), OMP_NUM_THREADS="1", **extra)


def torchrun(worker: str, args: list[str], nproc: int = 2, timeout: int = 180, env: dict | None = None) -> None:
    """``torchrun --standalone --nproc-per-node=NPROC WORKER ARGS``; fails the test with its stderr if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", worker, *args]
    env = env or worker_env()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and "SIGABRT" in result.stderr:
        # Seen once in ~20 runs on the 2-core CI machine: a gloo worker aborted at start-up. Try once more;
        # a real failure fails twice.
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the caller retries if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(
    target: list[str], logs: Path, nnodes: int = 2, timeout: int = 240, env: dict | None = None
) -> list[str]:
    """A multi-node rehearsal: NNODES torchrun agents, one process each, that meet at a static rendezvous on
    127.0.0.1 (the commands real machines run, with the master's address there). Node ``i`` runs ``TARGET`` with
    ``{node}`` replaced by ``i``; its output goes to LOGS/node{i}.log (a file: a full pipe would stall a node, and
    with it the collective that the other node waits in). Returns each node's output; fails the test if a node
    fails or runs out of time.
    """
    env = env or worker_env()
    for attempt in range(2):
        port = free_port()
        procs, files = [], []
        try:
            for node in range(nnodes):
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nnodes={nnodes}",
                    f"--node-rank={node}",
                    "--nproc-per-node=1",
                    "--master-addr=127.0.0.1",
                    f"--master-port={port}",
                    *(arg.replace("{node}", str(node)) for arg in target),
                ]
                files.append(open(logs / f"node{node}.log", "w"))  # noqa: SIM115 (closed below)
                # A session of its own per node: a timeout ends the agent and its workers, nothing else.
                procs.append(
                    subprocess.Popen(cmd, env=env, stdout=files[-1], stderr=subprocess.STDOUT, start_new_session=True)
                )
            for p in procs:
                p.wait(timeout=timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for f in files:
                f.close()
        errs = [(logs / f"node{node}.log").read_text() for node in range(nnodes)]
        codes = [p.returncode for p in procs]
        if all(code == 0 for code in codes):
            return errs
        # Another process took the port between free_port() and the master binding it; or the rare gloo start-up
        # abort (see torchrun). Once more with a new port; a real failure fails twice.
        retry = any("address already in use" in e.lower() or "SIGABRT" in e for e in errs)
        if attempt or not retry:
            break
    raise AssertionError(f"node exit codes {codes}:\n" + "\n".join(e[-3000:] for e in errs))
