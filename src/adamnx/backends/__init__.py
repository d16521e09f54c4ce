"""The executors of a step, and the one table that says what each supports and which options select it.

An executor applies a :class:`adamnx.plan.StepPlan` (it decides nothing the plan says: the coefficients' granularity,
the math dtype, what to write). Each is one module of this package and one :class:`Backend` row of :data:`BACKENDS`;
everything the rest of the code asks about an implementation — which constructor options select it, the devices and
dtypes it steps, the state formats it keeps, whether it runs ``capturable=True``, ``differentiable=True``, GradScaler's
``grad_scale``/``found_inf``, which layouts of the late-activation guard it executes and which starts it records itself,
whether its step is safe to capture in a CUDA graph, whether ``torch.compile`` traces it — is read from its row.

How to add an executor (a Triton kernel, a kernel for another device, another state format): write one module with a
function ``execute(plan: StepPlan) -> None`` and put one row in :data:`BACKENDS` (or :func:`register` it). Rows are
tried in order: the first whose ``options`` equal the group's flags and whose ``devices`` include the params' device
runs. ``tests/helpers.py`` makes an implementation of every row, so every test parametrized over the implementations
runs it; ``tests/toy_backend.py`` is such a module, registered from the test suite alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adamnx.backends import foreach, fused_cpu, fused_inductor, loop
from adamnx.guard import ELEMENT, LAYOUTS, ROW
from adamnx.plan import StepPlan

__all__ = [
    "BACKENDS",
    "FLOATING_DTYPES",
    "Backend",
    "register",
    "resolve_flags",
    "rows_for",
    "select",
    "selected",
]

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """One row of the table: an executor and everything the rest of the code asks about it.

    ``options``: the constructor flags that select it, all of them (``AdamNX(params, **options)``).
    ``devices``/``dtypes``: the device types and real dtypes of the params it steps (None: any; complex params run
    as real views). ``state_dtypes``: what ``state_dtype`` (the moments' format) may be.
    ``capturable``: ``capturable=True`` runs it with the coefficients computed on the device from the step tensors,
    no host sync. ``differentiable``: it runs ``differentiable=True``. ``amp``: it takes GradScaler's
    ``grad_scale``/``found_inf`` (unscaling in the step, skipping inf steps).
    ``guard_layouts``: the layouts of ``per_coordinate_steps`` lags (:mod:`adamnx.guard`) it executes (others are
    expanded to ``element``); ``records_starts``: the layouts whose starts it records itself (the planner records
    the others before it runs). ``cuda_graph_safe``: its step, without the guard, syncs nothing with the host, so it
    can be captured in a CUDA graph without ``capturable=True``. ``traced``: ``torch.compile(opt.step)`` traces it
    into the graph (False: it runs as it is, outside). ``prepare``: called (once per step, before anything changes)
    to build what it needs, such as a C++ kernel; it raises to refuse the step. ``advance_steps``: a faster way to
    advance host step counters by one and read them (one call for hundreds of counters), for the planner.
    ``quantized_state``: it steps 8-bit moments (:mod:`adamnx.quantized`, :class:`adamnx.AdamNX8bit`).
    """

    name: str
    execute: Callable[[StepPlan], None]
    options: Mapping[str, bool]
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    state_dtypes: tuple[torch.dtype, ...] = FLOATING_DTYPES
    capturable: bool = False
    differentiable: bool = False
    amp: bool = False
    guard_layouts: frozenset[str] = frozenset(LAYOUTS)
    records_starts: frozenset[str] = frozenset()
    cuda_graph_safe: bool = False
    traced: bool = True
    quantized_state: bool = False
    prepare: Callable[[], None] | None = None
    advance_steps: Callable[[list[Tensor]], list[float]] | None = None
    notes: str = field(default="", compare=False)

    def option(self) -> str:
        """The options that select it, as a user writes them: ``fused=True``."""
        return ", ".join(f"{key}={value}" for key, value in self.options.items() if value)

    def steps(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def supports(self, p: Tensor) -> bool:
        """Whether it steps this param (device and real dtype)."""
        return self.steps(p.device.type) and (self.dtypes is None or p.dtype in self.dtypes or p.is_complex())


BACKENDS: dict[str, Backend] = {
    "fused": Backend(
        "fused",
        fused_cpu.execute,
        {"fused": True, "foreach": False},
        devices=("cpu",),
        dtypes=FLOATING_DTYPES,
        amp=True,
        records_starts=frozenset({ROW, ELEMENT}),
        traced=False,
        quantized_state=True,
        prepare=fused_cpu.prepare,
        advance_steps=fused_cpu.advance_steps,
        notes="the C++ kernel: one pass over memory, one parallel region for all tensors of a dtype",
    ),
    "fused-inductor": Backend(
        "fused-inductor",
        fused_inductor.execute,
        {"fused": True, "foreach": False},
        devices=("cuda",),
        dtypes=FLOATING_DTYPES,
        amp=True,
        guard_layouts=frozenset({ELEMENT}),
        records_starts=frozenset({ELEMENT}),
        cuda_graph_safe=True,
        quantized_state=True,
        notes="a TorchInductor-generated kernel (Triton on CUDA), CHUNK tensors per compiled call",
    ),
    "foreach": Backend(
        "foreach",
        foreach.execute,
        {"fused": False, "foreach": True},
        capturable=True,
        quantized_state=True,
        notes="torch's _foreach_ kernels, a kernel per operation for a list of tensors",
    ),
    "for-loop": Backend(
        "for-loop",
        loop.execute,
        {"fused": False, "foreach": False},
        capturable=True,
        differentiable=True,
        quantized_state=True,
        notes="torch ops, tensor by tensor",
    ),
}
"""The executors by name, tried in this order. The fused rows come first: their options are ``fused=True``, and a
device without a fused row is refused rather than run by another row."""

# Devices where torch defaults to its foreach kernels; CPU keeps the for-loop, like torch.optim does.
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia", "hpu")
_SELECTED: list[str] = []


def register(backend: Backend, *, before: str | None = None) -> None:
    """Add a row to the table (before the row ``before``, else last). Its name must be new."""
    if backend.name in BACKENDS:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    rows = list(BACKENDS.items())
    at = len(rows) if before is None else [name for name, _ in rows].index(before)
    rows.insert(at, (backend.name, backend))
    BACKENDS.clear()
    BACKENDS.update(rows)


def unregister(name: str) -> None:
    del BACKENDS[name]


@contextlib.contextmanager
def selected(name: str) -> Iterator[None]:
    """Run row ``name`` for every group whose flags select its options, on any device (for tests: the accelerator
    kernel on the CPU)."""
    _SELECTED.append(name)
    try:
        yield
    finally:
        _SELECTED.pop()


def resolve_flags(
    fused: bool | None,
    foreach: bool | None,
    params: Sequence[Tensor],
    *,
    differentiable: bool = False,
    capturable: bool = False,
    lr: Any = None,
) -> dict[str, bool]:
    """The flags of a step, with torch.optim's default when neither ``fused`` nor ``foreach`` is set: foreach when
    every param is a plain tensor (or DTensor) on an accelerator, never when differentiable, and not for a Tensor lr
    that foreach would refuse (without capturable)."""
    if fused is None and foreach is None:
        foreach = not (differentiable or torch.jit.is_scripting()) and all(
            p is None or (_is_plain_or_dtensor(p) and p.device.type in _FOREACH_DEFAULT_DEVICES) for p in params
        )
        if foreach and isinstance(lr, Tensor) and not capturable:
            foreach = False
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    return {"fused": bool(fused), "foreach": bool(foreach)}


def _is_plain_or_dtensor(p: Tensor) -> bool:
    return type(p) in (Tensor, torch.nn.Parameter) or type(p).__name__ == "DTensor"


def _matches(backend: Backend, flags: Mapping[str, bool]) -> bool:
    return all(flags.get(key, False) == value for key, value in backend.options.items())


def select(flags: Mapping[str, bool], device_type: str) -> Backend:
    """The row that steps params of ``device_type`` for these (resolved) flags."""
    rows = [b for b in BACKENDS.values() if _matches(b, flags)]
    if not rows:
        raise RuntimeError(f"no implementation is selected by {dict(flags)}")
    for name in reversed(_SELECTED):
        if name in BACKENDS and BACKENDS[name] in rows:
            return BACKENDS[name]
    for backend in rows:
        if backend.steps(device_type):
            return backend
    devices = sorted({d for b in rows for d in (b.devices or ())})
    raise RuntimeError(f"{rows[0].option()} supports floating-point params on {devices}; got params on {device_type}")


def rows_for(fused: bool | None, foreach: bool | None) -> list[Backend]:
    """The rows a group with these options may run: those of its flags, or both defaults' when neither is set (the
    default chooses by device at each step). A group's params and state_dtype must suit every one."""
    if fused is None and foreach is None:
        candidates = [{"fused": False, "foreach": False}, {"fused": False, "foreach": True}]
    else:
        candidates = [{"fused": bool(fused), "foreach": bool(foreach)}]
    return [b for b in BACKENDS.values() if any(_matches(b, flags) for flags in candidates)]
