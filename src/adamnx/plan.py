"""The planner: what one step of one param group computes, decided once, for whichever executor applies it.

:func:`plan_step` turns a group's tensors into a :class:`StepPlan`: buckets of tensors that share a device and a
dtype (what one multi-tensor kernel steps), each with its math dtype, whether the update is computed on wider copies
(and rounded stochastically), each tensor's step count after this step, and, with the late-activation guard, each
tensor's lags (:mod:`adamnx.guard`): coefficients per tensor, per row or per element. An executor (a row of
:mod:`adamnx.backends`) applies the plan and decides nothing about it; it asks the plan for coefficients in the form it
consumes (:meth:`Bucket.scalar_coefficients`, :meth:`Bucket.row_coefficients`, :meth:`Bucket.element_coefficients`,
:func:`device_coefficients`).

What a step writes, and who writes it:

* the step counters: advanced here, before anything else (by 1 − found_inf on the device with a GradScaler);
* the lags of coordinates that start (a non-zero gradient where none was): recorded here, before the executor runs,
  for every layout the executor does not record itself (``Backend.records_starts``), and after it, by
  :func:`finish`, for the tensors it hands back. Starting and not-started coordinates take the same coefficients
  (those of t = 1), so the update does not depend on when starts are recorded;
* params and moments: the executor.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from adamnx import guard
from adamnx._dtensor import is_dtensor, local_part, placed_like
from adamnx._table import coordinate_table, count_coefficients, host_coefficients
from adamnx.guard import ELEMENT, NOT_STARTED, TENSOR
from adamnx.schedule import coefficients
from adamnx.update import Weights, math_dtype

__all__ = [
    "Bucket",
    "Executor",
    "GuardPlan",
    "Hyperparameters",
    "StepPlan",
    "device_coefficients",
    "finish",
    "plan_step",
]


class Executor(Protocol):
    """What the planner asks of the executor it plans for (a row of ``adamnx.backends.BACKENDS``)."""

    @property
    def amp(self) -> bool: ...  # it takes GradScaler's grad_scale/found_inf
    @property
    def capturable(self) -> bool: ...  # it runs capturable=True (on the device, no host sync)
    @property
    def guard_layouts(self) -> frozenset[str]: ...  # the guard's layouts it executes
    @property
    def records_starts(self) -> frozenset[str]: ...  # the layouts whose starts it records itself
    @property
    def advance_steps(self) -> Callable[[list[Tensor]], list[float]] | None: ...  # a faster counter advance


@dataclass(frozen=True)
class Hyperparameters:
    """The hyperparameters of one step of one param group. ``lr`` may be a 0-d Tensor (a scheduler's, or a traced
    one)."""

    beta1: float
    beta2: float
    lr: float | Tensor
    weight_decay: float
    eps: float
    maximize: bool
    stochastic_rounding: bool = False


@dataclass
class GuardPlan:
    """The late-activation guard in one bucket: each tensor's lags (0-d, per row or per element: its layout), where
    to store a new lag tensor, and the coefficient table the per-row and per-element layouts read."""

    lags: list[Tensor]
    layouts: list[str]
    states: list[dict[str, Any]]
    relative_steps: list[int]  # host mode: each tensor's step as its lags see it (guard.relative_step)
    steps: list[Tensor]
    betas: tuple[float, float]
    math_dtype: torch.dtype
    device: torch.device
    past_first_window: bool = False  # host mode: a step is past 2^30, so counts may be longer than relative steps
    tensor_lags: dict[int, int] = field(default_factory=dict)  # host mode: the values of the lags kept per tensor
    _table: Tensor | None = None
    _table_ready: bool = False

    def table(self) -> Tensor | None:
        """The coefficient table (3, L) every count of this step indexes (clamped to its last row), on the bucket's
        device in the math dtype; None when the counts are too long for one (evaluate per element instead)."""
        if not self._table_ready:
            # A coordinate's count is at most its tensor's step (on the device: one host read, to size the table).
            # Past step 2^30 the relative step starts over while counts go on: then the lags say how long they are.
            longest = max(self.relative_steps) if self.relative_steps else int(torch.stack(self.steps).max())
            if self.past_first_window:
                longest = max(longest, self._longest_count())
            self._table = coordinate_table(longest, self._longest_count, *self.betas, self.math_dtype, self.device)
            self._table_ready = True
        return self._table

    def _longest_count(self) -> int:
        """The longest count of any coordinate: the step minus a tensor's smallest lag (a pass over the lags)."""
        longest = 0
        for i, lag in enumerate(self.lags):
            smallest = int(lag.min()) if lag.numel() else NOT_STARTED
            if smallest != NOT_STARTED:
                t = self.relative_steps[i] if self.relative_steps else guard.relative_step(float(self.steps[i]))
                longest = max(longest, min(t - smallest, guard.MAX_COUNT))
        return longest

    def coefficients_of(self, i: int, lag: Tensor | None = None) -> Weights:
        """(1 − β1_t, β̂2_t, 1 − β̂2_t) of the counts of tensor ``i`` (or of ``lag``, a view of its lags), shaped like
        the lags, in the math dtype: gathered from the table, or evaluated per element when there is none."""
        lag = self.lags[i] if lag is None else lag
        if is_dtensor(lag):  # FSDP2 (lags per element): this rank's counts, their weights placed like the lags
            return Weights(*(placed_like(w, lag) for w in self.coefficients_of(i, local_part(lag))))
        table = self.table()
        # count = relative step − lag, clamped into the table (row 0: not started; the last row: every longer count)
        last = guard.MAX_COUNT if table is None else table.shape[1] - 1
        count = (self.relative_steps[i] - lag.to(torch.int64)).clamp_(0, last)
        return Weights(*count_coefficients(self.betas if table is None else table, count, self.math_dtype, clamp=False))

    def device_counts(self, i: int, step: Tensor) -> Tensor:
        """The counts of tensor ``i`` (lags per element) computed on the device from its step tensor."""
        return guard.counts_on_device(self.lags[i], step)

    def expanded(self, i: int, real_param: Tensor) -> Tensor:
        """Tensor ``i``'s lags, one per element (a copy unless they are kept so)."""
        return guard.expand(self.lags[i], real_param)


@dataclass
class Bucket:
    """Tensors of one group that share a device and a param dtype (complex ones as their real views)."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]  # the 0-d step counters, already advanced
    math_dtype: torch.dtype
    stochastic: bool  # bf16 params rounded stochastically
    wider: bool  # the math is wider than what the tensors hold: the update runs on copies
    step_values: list[float] | None  # host mode: each tensor's step count after this step; None on the device
    betas: tuple[float, float]
    guard: GuardPlan | None = None
    # 8-bit moments (adamnx.quantized): each tensor's (exp_avg_absmax, exp_avg_sq_absmax), the scales of its codes;
    # exp_avgs/exp_avg_sqs then hold int8/uint8 codes. None: the moments are floats.
    scales: list[tuple[Tensor, Tensor]] | None = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def scalar_coefficients(self, i: int) -> Weights:
        """Host mode: ``(1 − β1_t, β̂2_t, 1 − β̂2_t)`` of tensor ``i`` as Python floats: its step's, or with the guard
        (layout TENSOR) its count's."""
        assert self.step_values is not None
        count = self.step_values[i]
        if self.guard is not None:
            lag = self.guard.tensor_lags.get(i)
            lag = int(self.guard.lags[i]) if lag is None else lag
            count = min(max(self.guard.relative_steps[i] - lag, 0), guard.MAX_COUNT)
        w1, w2 = host_coefficients(count, *self.betas)
        return Weights(w1, 1 - w2, w2)

    def row_coefficients(self, i: int) -> Weights:
        """Layout ROW: one set per row, shaped (R, 1, ..., 1) to broadcast over the param."""
        assert self.guard is not None
        return self.guard.coefficients_of(i)

    def element_coefficients(self, i: int, lag: Tensor | None = None) -> Weights:
        """Any layout, one set per element: shaped like the param, or like ``lag`` (a view of the tensor's lags
        broadcast to the param, as pieces of it are)."""
        assert self.guard is not None
        if lag is None:
            lag = self.guard.lags[i].to(self.device).expand(self.params[i].shape)
        return self.guard.coefficients_of(i, lag)


@dataclass
class StepPlan:
    """One step of one param group: its buckets, its hyperparameters and how it runs."""

    buckets: list[Bucket]
    hp: Hyperparameters
    grad_scale: Tensor | None
    found_inf: Tensor | None
    on_device: bool  # coefficients computed on the device from the step tensors (capturable, torch.compile)
    capturable: bool
    differentiable: bool
    handed_back: list[tuple[int, int]] = field(default_factory=list)  # (bucket, tensor) the executor left to finish


def device_coefficients(step: Tensor, betas: tuple[float, float], dtype: torch.dtype) -> Weights:
    """The weights of step (or count) tensors, computed on their device (no host sync), in ``dtype`` (β̂2_t formed
    there from 1 − β̂2_t)."""
    w1, w2 = (w.to(dtype) for w in coefficients(step, betas))
    return Weights(w1, 1 - w2, w2)


def _readable_on_host(t: Tensor) -> bool:
    """Whether reading ``t`` costs nothing: on the CPU, outside a compiled graph (an accelerator's would sync)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _same(t: Tensor) -> Tensor:
    return t


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _group_by_device_and_dtype(params: Sequence[Tensor], exp_avgs: Sequence[Tensor]) -> list[list[int]]:
    """Indices of tensors that share a device, a param dtype and a state dtype (8-bit codes apart from floats)."""
    buckets: dict[tuple[torch.device, torch.dtype, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype, exp_avgs[i].dtype)].append(i)
    return list(buckets.values())


def plan_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    backend: Executor,
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = True,
    guard_states: list[dict[str, Any]] | None = None,
    moment_scales: list[tuple[Tensor, Tensor] | None] | None = None,
) -> StepPlan | None:
    """Plan one step of these tensors on ``backend``, advancing their step counters (and recording the guard's
    starts the backend does not record itself). None: nothing to step (no tensors, or a GradScaler found inf/NaN
    and the counters live on the host, where reading that costs nothing).

    ``has_complex`` False (no complex tensor among them) saves looking for complex ones. ``guard_states``: with
    per_coordinate_steps, each param's state dict, whose ``coord_lag`` the plan reads and replaces when its layout
    changes. ``moment_scales``: per param, the scales of its 8-bit moments (:mod:`adamnx.quantized`), or None where
    they are floats.
    """
    if not params:
        return None
    if (grad_scale is not None or found_inf is not None) and not backend.amp:
        raise RuntimeError("grad_scale/found_inf are only supported by fused=True")
    if found_inf is not None and _readable_on_host(found_inf):
        if found_inf.item():
            return None  # it found inf/NaN: params, moments and counters stay as they were (as torch's fused Adam)
        found_inf = None  # nothing to skip
    capturable = capturable and backend.capturable
    if capturable and not torch.compiler.is_compiling():
        for p, step in zip(params, state_steps):
            if p.device != step.device:
                raise RuntimeError(
                    "With capturable=True, params and state steps must be on the same device; "
                    f"got a param on {p.device} and its step on {step.device}"
                )
    # On the device: the coefficients come from the step tensors where they live, and nothing is read on the host.
    on_device = capturable or torch.compiler.is_compiling() or state_steps[0].device.type != "cpu"
    if on_device:
        increment: Any = 1.0 if found_inf is None else 1 - found_inf.to(state_steps[0].device, state_steps[0].dtype)
        torch._foreach_add_(state_steps, increment)
        step_values = None
    elif backend.advance_steps is not None:
        step_values = backend.advance_steps(state_steps)
    else:
        torch._foreach_add_(state_steps, 1.0)
        step_values = torch.stack(state_steps).tolist() if len(state_steps) > 1 else [state_steps[0].item()]
    plan = StepPlan([], hp, grad_scale, found_inf, on_device, capturable, differentiable)
    stochastic_rounding = hp.stochastic_rounding
    for indices in _group_by_device_and_dtype(params, exp_avgs):
        first = params[indices[0]]
        scales = None if moment_scales is None else moment_scales[indices[0]]
        state_dtype = exp_avgs[indices[0]].dtype if scales is None else torch.float32  # 8-bit: float32 math
        dtype = math_dtype(first.dtype, state_dtype)
        stochastic = stochastic_rounding and first.dtype == torch.bfloat16
        real = _real if has_complex else _same
        bucket = Bucket(
            [real(params[i]) for i in indices],
            [real(grads[i]) for i in indices],
            [real(exp_avgs[i]) for i in indices],
            [real(exp_avg_sqs[i]) for i in indices],
            [state_steps[i] for i in indices],
            dtype,
            stochastic,
            wider=stochastic or first.dtype != dtype or exp_avgs[indices[0]].dtype != dtype,
            step_values=None if step_values is None else [step_values[i] for i in indices],
            betas=(hp.beta1, hp.beta2),
            scales=None if scales is None else [_scales_of(moment_scales, i) for i in indices],
        )
        if guard_states is not None:
            bucket.guard = _plan_guard(bucket, [guard_states[i] for i in indices], backend, plan)
        plan.buckets.append(bucket)
    return plan


def _scales_of(moment_scales: Any, i: int) -> tuple[Tensor, Tensor]:
    scales = moment_scales[i]
    assert scales is not None  # a bucket's tensors share a state dtype: 8-bit codes all have scales
    return scales


def _plan_guard(bucket: Bucket, states: list[dict[str, Any]], backend: Executor, plan: StepPlan) -> GuardPlan:
    """The bucket's lags in layouts the backend executes, with the starts it does not record itself recorded."""
    lags, layouts = [], []
    for state, param, grad, step in zip(states, bucket.params, bucket.grads, bucket.steps):
        lag = state.get("coord_lag")
        if lag is None:
            lag = state["coord_lag"] = guard.fresh_lag(param)
        layout = guard.layout_of(lag, param.shape)
        if layout not in backend.guard_layouts or (plan.on_device and layout != ELEMENT):
            lag = state["coord_lag"] = guard.expand(lag, param)
            layout = ELEMENT
        if plan.on_device and ELEMENT not in backend.records_starts:
            guard.record_starts_on_device(lag, grad, step, plan.found_inf)
        lags.append(lag)
        layouts.append(layout)
    relative = [] if bucket.step_values is None else [guard.relative_step(s) for s in bucket.step_values]
    for i, t in enumerate(relative):
        if t == 0 and bucket.step_values is not None and bucket.step_values[i] > 0:  # a new window
            lags[i] = guard.rebase(lags[i])
    plan_guard = GuardPlan(
        lags, layouts, states, relative, bucket.steps, bucket.betas, bucket.math_dtype, bucket.device,
        past_first_window=any(s >= guard.WINDOW for s in bucket.step_values or ()),
    )  # fmt: skip
    if plan.on_device:
        return plan_guard
    # The lags kept one per tensor, read in one go (a model has hundreds of tensors): those that have started need
    # nothing recorded, and their weights are read from here.
    whole = [i for i, layout in enumerate(layouts) if layout == TENSOR]
    plan_guard.tensor_lags = dict(zip(whole, torch.stack([lags[i] for i in whole]).tolist())) if whole else {}
    for i, layout in enumerate(layouts):
        waiting = layout != TENSOR or plan_guard.tensor_lags[i] == NOT_STARTED
        if waiting and layout not in backend.records_starts:
            _record(plan_guard, bucket, i, _grad_factor(plan))
    return plan_guard


def _grad_factor(plan: StepPlan) -> float:
    """The factor a fused kernel scales the gradients by before it tests them for zero: 1/GradScaler's scale."""
    return 1.0 if plan.grad_scale is None else 1.0 / float(plan.grad_scale)


def _record(plan_guard: GuardPlan, bucket: Bucket, i: int, grad_factor: float) -> None:
    assert bucket.step_values is not None
    before = plan_guard.lags[i]
    lag = guard.record_starts(before, bucket.grads[i], bucket.step_values[i], grad_factor, bucket.math_dtype)
    if lag is not before:
        plan_guard.states[i]["coord_lag"] = plan_guard.lags[i] = lag
        plan_guard.layouts[i] = guard.layout_of(lag, bucket.params[i].shape)
    if plan_guard.layouts[i] == TENSOR:
        plan_guard.tensor_lags[i] = int(lag)
    else:
        plan_guard.tensor_lags.pop(i, None)


def finish(plan: StepPlan) -> None:
    """Record the starts of the tensors the executor handed back (a row of an embedding that started in part)."""
    for b, i in plan.handed_back:
        bucket = plan.buckets[b]
        assert bucket.guard is not None
        _record(bucket.guard, bucket, i, _grad_factor(plan))
