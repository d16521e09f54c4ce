r"""The late-activation guard's state: when each coordinate started, written once, not a count rewritten every step.

``per_coordinate_steps=True`` counts each coordinate's steps from its first non-zero gradient. A coordinate that
started at tensor step :math:`s` has count :math:`t - s + 1` at tensor step :math:`t`. Instead of rewriting that count
at every step, the optimizer keeps the coordinate's **lag** :math:`s - 1` (the steps its tensor took before it
started), written once, when it starts, and every step reads its count as :math:`t - \text{lag}`. A coordinate that has
not started has the lag ``NOT_STARTED``, whose count clamps to 0 (its coefficients are those of t = 1, the same as at
its first step). Counts saturate at ``MAX_COUNT`` (int32), as a checkpoint's ``coord_step`` does.

A tensor's lags are kept in ``state["coord_lag"]``, an int32 tensor broadcastable to the parameter's real view, at
the coarsest **layout** that holds them:

* ``TENSOR``: one lag (a 0-d CPU tensor, readable without a device sync): every coordinate started at the same step,
  or none has. A dense layer, from its first step on. A step then takes the tensor's own coefficients: the guard
  costs nothing.
* ``ROW``: one lag per row (shape ``(R, 1, ..., 1)``): every row started as a whole (an embedding's rows).
* ``ELEMENT``: one lag per coordinate.

The layout is the guard's summary of the tensor, and it lives nowhere else: a step reads it from the shape of
``coord_lag``, and it only gets finer, when coordinates of the tensor start at different steps
(:func:`record_starts`). Loading a checkpoint picks the coarsest layout again (:func:`lags_from_counts`).

Lags fit int32 however long the run: they are kept relative to a window base :math:`B(t) = 2^{30}\lfloor t/2^{30}
\rfloor` (0 for the first billion steps), and shift once when the tensor's step enters a new window (:func:`rebase`).
Executors see the step as ``relative_step(t)`` :math:`= t - B(t)` and a count as
``clamp(relative_step − lag, 0, MAX_COUNT)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ELEMENT",
    "LAYOUTS",
    "MAX_COUNT",
    "NOT_STARTED",
    "ROW",
    "TENSOR",
    "WINDOW",
    "counts",
    "counts_on_device",
    "expand",
    "fits",
    "fresh_lag",
    "lags_after_starts",
    "lags_from_counts",
    "layout_of",
    "rebase",
    "record_starts",
    "record_starts_on_device",
    "relative_step",
    "relative_step_on_device",
    "shifted_to_window",
]

TENSOR, ROW, ELEMENT = "tensor", "row", "element"
LAYOUTS = (TENSOR, ROW, ELEMENT)

MAX_COUNT = 2**31 - 1  # counts saturate here (int32), as coord_step in a checkpoint does
NOT_STARTED = 2**31 - 1  # the lag of a coordinate that has not started: relative_step − lag < 0, its count 0
_SATURATED = -(2**31)  # a lag this low gives MAX_COUNT at any step of its window
WINDOW = 2**30
# Rows shorter than this gather nearly as many coefficients as elements: such tensors keep lags per element.
MIN_ROW = 8


def relative_step(step: float) -> int:
    """``t − B(t)``: the step as the window's lags see it (``t`` itself for the first 2^30 steps)."""
    return int(step) % WINDOW


def layout_of(lag: Tensor, shape: torch.Size | tuple[int, ...]) -> str:
    """The layout of ``lag`` for a parameter whose real view has ``shape``."""
    if lag.dim() == 0:
        return TENSOR
    return ELEMENT if tuple(lag.shape) == tuple(shape) else ROW


def fits(lag: Tensor, param: Tensor) -> bool:
    """Whether ``lag`` is a lag tensor of one of the layouts for this param (int32; 0-d, per row, or per element of
    its real view)."""
    if not isinstance(lag, Tensor) or lag.dtype != torch.int32:
        return False
    if lag.dim() == 0:
        return True
    shape = (*param.shape, 2) if param.is_complex() else tuple(param.shape)
    if tuple(lag.shape) == shape:
        return True
    return len(shape) >= 2 and tuple(lag.shape) == (shape[0],) + (1,) * (len(shape) - 1)


def fresh_lag(real_param: Tensor) -> Tensor:
    """The lags of a parameter before its first step: nothing has started. One lag for the tensor; one per element
    for a DTensor, whose shards each see only part of the gradient (a tensor-wide decision would differ by rank)."""
    if _is_plain(real_param):
        return torch.tensor(NOT_STARTED, dtype=torch.int32)
    return torch.full_like(real_param, NOT_STARTED, dtype=torch.int32)


def _is_plain(t: Tensor) -> bool:
    return type(t) in (Tensor, torch.nn.Parameter)


def counts(lag: Tensor, step: float, real_param: Tensor) -> Tensor:
    """Every coordinate's count at tensor step ``step`` (int32, shaped like the real view): a checkpoint's
    ``coord_step``."""
    count = (relative_step(step) - lag.to(device=real_param.device, dtype=torch.int64)).clamp_(0, MAX_COUNT)
    return count.to(torch.int32).expand(real_param.shape).clone(memory_format=torch.contiguous_format)


def lags_from_counts(count: Tensor, step: float, like: Tensor | None = None) -> Tensor:
    """The lags of a checkpoint's counts (int32, shaped like the real view) at tensor step ``step``, in the coarsest
    layout that holds them; lags per element in the memory format of ``like`` (the param's real view), so that the
    kernels walk them with the param. Exact: :func:`counts` gives ``count`` back."""
    t = relative_step(step)
    count = count.to(torch.int32)  # t < 2^30 and 0 ≤ count < 2^31: t − count is exact in int32 (no int64 copies)
    lag = torch.where(count == 0, NOT_STARTED, t - count)
    if _is_plain(lag) and lag.numel():
        flat = lag.reshape(-1)
        if bool((flat == flat[0]).all()):
            return flat[0].to("cpu").clone()
        rows = _rows(lag)
        if rows is not None and bool((rows == rows[:, :1]).all()):
            return rows[:, :1].reshape(_row_shape(lag)).clone()
    if like is None:
        return lag.contiguous()
    return torch.empty_like(like, dtype=torch.int32).copy_(lag)


def _row_shape(t: Tensor) -> tuple[int, ...]:
    return (t.shape[0],) + (1,) * (t.dim() - 1)


def _rows(t: Tensor) -> Tensor | None:
    """``t`` as (rows, row length), when it has rows worth a lag each: at least 2-d, rows ≥ MIN_ROW elements."""
    if t.dim() < 2 or t.numel() < MIN_ROW * t.shape[0] or t.numel() == 0:
        return None
    return t.reshape(t.shape[0], -1)


def expand(lag: Tensor, real_param: Tensor) -> Tensor:
    """The same lags, one per element (on the parameter's device)."""
    if layout_of(lag, real_param.shape) == ELEMENT:
        return lag
    return torch.empty_like(real_param, dtype=torch.int32).copy_(lag.to(real_param.device).expand(real_param.shape))


def rebase(lag: Tensor) -> Tensor:
    """The lags relative to the next window's base (in place): called when the tensor's step enters a new window."""
    started = lag != NOT_STARTED
    shifted = (lag.to(torch.int64) - WINDOW).clamp_(min=_SATURATED).to(torch.int32)
    return lag.copy_(torch.where(started, shifted, lag))


def _started_coordinates(grad: Tensor, grad_factor: float, math_dtype: torch.dtype | None) -> Tensor:
    """Where this step's gradient is non-zero (NaN included): a coordinate there has started. ``grad_factor``: the
    factor the step scales the gradient by (GradScaler's 1/scale), applied in the math dtype as the kernels do (an
    fp16 gradient of 1e-3 scaled by 1/65536 is 0 in fp16, not in float32)."""
    if grad_factor == 1.0:
        return grad != 0
    return grad.to(math_dtype or grad.dtype) * grad_factor != 0


def _rows_with_a_start(rows: Tensor, grad_factor: float, math_dtype: torch.dtype | None) -> Tensor:
    """Which rows have a non-zero (or NaN) gradient: their largest or smallest value is not 0 (two fast reductions,
    no temporary), or, with a GradScaler's factor, the scaled values as a kernel tests them."""
    if grad_factor == 1.0:
        return (rows.amax(1) != 0) | (rows.amin(1) != 0)
    return _started_coordinates(rows, grad_factor, math_dtype).any(1)


def record_starts(
    lag: Tensor, real_grad: Tensor, step: float, grad_factor: float = 1.0, math_dtype: torch.dtype | None = None
) -> Tensor:
    """The lags after a step at tensor step ``step``: every coordinate that had not started and has a non-zero
    gradient starts now (lag ``relative_step(step) − 1``).

    In place while the layout still holds; a new, finer lag tensor when it does not (the caller stores it): a tensor
    whose coordinates start at different steps goes from TENSOR to ROW (whole rows) or ELEMENT; a ROW tensor whose row
    starts in part goes to ELEMENT. Host reads: one per tensor that has not started, one per ROW tensor.
    """
    start = relative_step(step) - 1
    kind = layout_of(lag, real_grad.shape)
    if kind == TENSOR:
        if int(lag) != NOT_STARTED:
            return lag
        nonzero = _started_coordinates(real_grad, grad_factor, math_dtype)
        if not bool(nonzero.any()):
            return lag
        if bool(nonzero.all()):
            return lag.fill_(start)
        rows = _rows(nonzero)
        if rows is not None:
            started, whole = rows.any(1), rows.all(1)
            if bool((started == whole).all()):  # every row started whole, or not at all
                return torch.where(whole, start, NOT_STARTED).to(torch.int32).view(_row_shape(nonzero))
        return torch.where(nonzero, start, NOT_STARTED).to(torch.int32)
    if kind == ROW:
        row_lags = lag.view(-1)
        waiting = row_lags == NOT_STARTED
        count = int(waiting.sum())
        if count == 0:
            return lag
        grad_rows = real_grad.reshape(real_grad.shape[0], -1)
        if count * 8 < row_lags.numel():  # few rows wait: look at those alone
            rows = waiting.nonzero().squeeze(1)
            starting = rows[_rows_with_a_start(grad_rows.index_select(0, rows), grad_factor, math_dtype)]
        else:  # most rows wait (an embedding's rare rows): look at every row, once
            starting = (_rows_with_a_start(grad_rows, grad_factor, math_dtype) & waiting).nonzero().squeeze(1)
        if starting.numel() == 0:
            return lag
        whole = _started_coordinates(grad_rows.index_select(0, starting), grad_factor, math_dtype).all(1)
        if bool(whole.all()):  # every row that starts starts whole
            row_lags.index_fill_(0, starting, start)
            return lag
        lag = expand(lag, real_grad)  # a row starts in part: its coordinates start at different steps
    waiting = lag == NOT_STARTED
    if bool(waiting.any()):  # once every coordinate has started, nothing is written
        lag.masked_fill_(waiting & _started_coordinates(real_grad, grad_factor, math_dtype), start)
    return lag


def shifted_to_window(lag: Tensor, new_window: Tensor) -> Tensor:
    """:func:`rebase` out of place and without a host read: the lags shifted where ``new_window`` (a 0-d bool
    tensor) says the step just entered a new window."""
    shifted = (lag.to(torch.int64) - WINDOW).clamp(min=_SATURATED)
    return torch.where(new_window & (lag != NOT_STARTED), shifted, lag.to(torch.int64)).to(torch.int32)


def lags_after_starts(lag: Tensor, nonzero: Tensor, relative: Tensor) -> Tensor:
    """The lags after a step's starts, out of place and without a host read: a coordinate that had not started and
    has a non-zero gradient (``nonzero``) starts now. ``relative``: the tensor's relative step (int64, 0-d)."""
    return torch.where((lag == NOT_STARTED) & nonzero, relative - 1, lag.to(torch.int64)).to(torch.int32)


def relative_step_on_device(step: Tensor) -> tuple[Tensor, Tensor]:
    """``relative_step`` of a step tensor, on its device (int64, 0-d), and whether the step just entered a window."""
    relative = torch.remainder(step.to(torch.float64), WINDOW)
    return relative.to(torch.int64), (relative == 0) & (step > 0)


def record_starts_on_device(lag: Tensor, real_grad: Tensor, step: Tensor, found_inf: Tensor | None = None) -> None:
    """:func:`record_starts` for lags per element, on their device, without reading anything on the host
    (``capturable=True``, ``torch.compile``): a new window's shift included, at the cost of rewriting every lag at
    every step. ``step``: the tensor's step counter, already advanced; ``found_inf`` (GradScaler's): a skipped step
    starts nothing."""
    relative, new_window = relative_step_on_device(step)
    after = lags_after_starts(shifted_to_window(lag, new_window), real_grad != 0, relative)
    lag.copy_(after if found_inf is None else torch.where(found_inf.to(lag.device) != 0, lag, after))


def counts_on_device(lag: Tensor, step: Tensor) -> Tensor:
    """Every coordinate's count (int64, shaped like ``lag``) at the tensor step ``step`` (a tensor), on the device."""
    relative = torch.remainder(step.to(torch.float64), WINDOW).to(torch.int64)
    return (relative - lag.to(torch.int64)).clamp_(0, MAX_COUNT)
