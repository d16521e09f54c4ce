"""Shared test machinery: the table of implementations and a driver that runs torch and the reference side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from adamnx import AdamNX, backends
from adamnx.backends import BACKENDS, Backend
from adamnx.reference import AdamNXReference


@dataclass(frozen=True)
class OptimizerInput:
    """One row of the input table: constructor kwargs and a description (as torch's OptimizerInput)."""

    kwargs: dict[str, Any]
    desc: str


@dataclass(frozen=True)
class ErrorOptimizerInput:
    """One row of the error table: what is passed, which exception, and a regex its message must match."""

    kwargs: dict[str, Any]
    error_type: type[Exception]
    error_regex: str
    desc: str = ""
    params: Any = field(default=None)


class _Selecting(AdamNX):
    """AdamNX whose steps run the row ``_row`` of the backend table, on the CPU too (see backends.selected)."""

    _row = ""

    def step(self, closure=None):
        with backends.selected(self._row):
            return super().step(closure)


@dataclass(frozen=True)
class Implementation:
    """One row of the implementation table: call it like the AdamNX class to get an optimizer that runs it.

    Deliberately not a mapping of constructor kwargs: ``AdamNX(params, **row)`` cannot run another kernel than the
    row names, because it is a TypeError.
    """

    kwargs: dict[str, Any]
    backend: Backend

    def __call__(self, params, **kwargs) -> AdamNX:
        # Always this row, whatever else the table holds (a row registered before it) and on the CPU too.
        cls = type(f"AdamNX_{self.backend.name}", (_Selecting,), {"_row": self.backend.name})
        return cls(params, **self.kwargs, **kwargs)


def _implementations() -> dict[str, Implementation]:
    """Every row of the backend table (adamnx.backends.BACKENDS), each followed by its capturable=True variant where
    the row runs one ("capturable" is the for-loop's). Each runs its own row, under backends.selected: a row that
    does not step CPU tensors (the accelerator kernel) runs on the CPU too."""
    table = {}
    for name, backend in BACKENDS.items():
        table[name] = Implementation(dict(backend.options), backend)
        if backend.capturable:
            capturable = "capturable" if name == "for-loop" else f"{name}-capturable"
            table[capturable] = Implementation({**backend.options, "capturable": True}, backend)
    return table


# Every implementation a user can select: a new row of the backend table is run by every test parametrized over it.
IMPLEMENTATIONS = _implementations()


def without_options(state_dict: dict) -> dict:
    """A state dict without the options a load keeps from the optimizer (foreach, fused, state_dtype, ...): to load
    one optimizer's state into another configured otherwise, with no warning about the difference."""
    from adamnx._validation import KEPT_ON_LOAD

    groups = [{k: v for k, v in g.items() if k not in KEPT_ON_LOAD} for g in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


def takes_tensor_lr(impl: str) -> bool:
    """torch.optim's rule: foreach takes a Tensor lr only with capturable=True."""
    kwargs = IMPLEMENTATIONS[impl].kwargs
    return not (kwargs.get("foreach") and not kwargs.get("capturable"))


def implementations(**capabilities: Any) -> list[str]:
    """The implementations whose rows have these capabilities (``amp=True``, ``differentiable=True``, ...), and
    ``capturable=True`` for the capturable variants only."""
    out = []
    for name, impl in IMPLEMENTATIONS.items():
        row = impl.backend
        wanted_capturable = capabilities.get("capturable")
        if wanted_capturable is not None and impl.kwargs.get("capturable", False) != wanted_capturable:
            continue
        if all(getattr(row, key) == value for key, value in capabilities.items() if key != "capturable"):
            out.append(name)
    return out


# The hyperparameter grid of the parity tests: β2 ∈ {0.9, 0.99, 0.999}, wd ∈ {0, 0.01}, maximize on/off.
HYPERPARAMETERS = [
    OptimizerInput({"lr": 1e-2, "betas": (0.9, b2), "weight_decay": wd, "maximize": mx}, f"b2={b2},wd={wd},max={mx}")
    for b2 in (0.9, 0.99, 0.999)
    for wd in (0.0, 0.01)
    for mx in (False, True)
]

SHAPES = [(5, 3), (7,), (2, 3, 4), ()]


def gradient_sequence(n_steps: int, shapes=SHAPES, seed: int = 0, dtype=torch.float64) -> list[list[torch.Tensor]]:
    """Random gradients whose scale drifts over several decades, as real training's do."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (torch.rand(n_steps, generator=g, dtype=torch.float64) * 3 - 2)
    return [
        [(torch.randn(s, generator=g, dtype=torch.float64) * scales[t]).to(dtype) for s in shapes]
        for t in range(n_steps)
    ]


def initial_params(shapes=SHAPES, seed: int = 1, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def run_torch(params0, grads_seq, impl: str | None = None, **kwargs) -> tuple[list[torch.Tensor], AdamNX]:
    """Run ``grads_seq`` through a fresh optimizer: implementation ``impl`` of the table, or plain AdamNX(**kwargs)."""
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = AdamNX(params, **kwargs) if impl is None else IMPLEMENTATIONS[impl](params, **kwargs)
    for grads in grads_seq:
        for p, gr in zip(params, grads):
            p.grad = None if gr is None else gr.clone()
        opt.step()
    return params, opt


def run_reference(params0, grads_seq, **kwargs) -> AdamNXReference:
    kwargs = {k: v for k, v in kwargs.items() if k in ("lr", "betas", "eps", "weight_decay", "maximize")}
    ref = AdamNXReference([p.double().numpy() for p in params0], **kwargs)
    for grads in grads_seq:
        ref.step([None if gr is None else gr.double().numpy() for gr in grads])
    return ref


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    """Norm-wise relative error max|a − e| / max|e| (0 when both are empty or zero)."""
    a = actual.detach().double().cpu().numpy()
    if a.size == 0:
        return 0.0
    denom = max(np.max(np.abs(expected)), 1e-300)
    return float(np.max(np.abs(a - expected)) / denom)


def assert_matches_reference(params, opt: AdamNX, ref: AdamNXReference, tol: float) -> None:
    for i, p in enumerate(params):
        state = opt.state[p]
        assert int(state["step"]) == ref.t[i]
        for name, actual, expected in (
            ("param", p, ref.theta[i]),
            ("exp_avg", state["exp_avg"], ref.m[i]),
            ("exp_avg_sq", state["exp_avg_sq"], ref.v[i]),
        ):
            err = rel_err(actual, expected)
            assert err <= tol, f"{name} {i}: relative error {err:.3e} > {tol:.0e}"


def late_starting_gradients(
    n_steps: int, shapes=SHAPES, dtype=torch.float64, seed: int = 0
) -> list[list[torch.Tensor]]:
    """Random gradients, zero for each coordinate until its start step (1 to ~1,100: some never start), and also
    zero for every coordinate at every 7th step (a coordinate that has started keeps counting through them)."""
    grads = gradient_sequence(n_steps, shapes=shapes, seed=seed)
    starts = [
        1 + (np.arange(int(np.prod(s, dtype=int))).reshape(s) * 211 + 37 * i) % 1_100 for i, s in enumerate(shapes)
    ]
    starts[0].flat[0] = 1  # a coordinate with a history from the first step
    for t, step_grads in enumerate(grads, start=1):
        for g, start in zip(step_grads, starts):
            g[torch.as_tensor(start > t)] = 0.0
            if t % 7 == 0:
                g.zero_()
    return [[g.to(dtype) for g in step_grads] for step_grads in grads]


def per_coordinate_reference(params0, grads_seq, lr, betas, weight_decay):
    """Each coordinate alone: decoupled weight decay only (m = v = 0, update 0) until its first non-zero gradient,
    then the paper's AdamNX (the float64 reference) from its own t = 1. Returns theta, m, v and counts, per tensor."""
    out = []
    for i, p0 in enumerate(params0):
        g = np.stack([step_grads[i].double().numpy() for step_grads in grads_seq]).reshape(len(grads_seq), -1)
        theta, m, v, count = (np.zeros(g.shape[1]) for _ in range(4))
        for k in range(g.shape[1]):
            nonzero = np.flatnonzero(g[:, k])
            start = int(nonzero[0]) if nonzero.size else len(grads_seq)  # 0-based index of its first step
            ref = AdamNXReference(
                [p0.double().numpy().reshape(-1)[k : k + 1]], lr=lr, betas=betas, weight_decay=weight_decay
            )
            ref.theta[0] *= (1.0 - lr * weight_decay) ** start
            for gk in g[start:, k]:
                ref.step([np.array([gk])])
            theta[k], m[k], v[k], count[k] = ref.theta[0][0], ref.m[0][0], ref.v[0][0], ref.t[0]
        out.append(tuple(x.reshape(p0.shape) for x in (theta, m, v, count)))
    return out
