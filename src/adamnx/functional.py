"""Functional AdamNX: :func:`adamnx` and its for-loop, multi-tensor (foreach) and fused implementations.

Shaped like ``torch.optim.adamw.adamw``: it takes flat lists of tensors and updates them in place.
Every implementation takes its coefficients from :func:`adamnx.schedule.coefficients`.

The implementations are the rows of one table, ``BACKENDS`` (name → ``adamnx._backends.Backend``: its step
function, the options that select it, the devices and dtypes it supports): :func:`adamnx` builds the step's
hyperparameters once (``adamnx._backends.Hyperparameters``), picks the row from ``fused``/``foreach`` and calls
its step. ``fused=True`` dispatches once more, per device, through ``adamnx._fused.FUSED_KERNELS``. How to add a
backend (a Triton kernel, MPS, 8-bit state), and how its tests then come from the same table: the docstring of
``adamnx._backends``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamnx._backends import FLOATING_DTYPES, Backend, Hyperparameters
from adamnx._fused import FUSED_KERNELS, fused_adamnx, prepare_fused
from adamnx._tensors import (
    BY_ROW,
    ON_STEP,
    GatheredCoordinates,
    advance_counts_,
    advance_known_counts_,
    coordinate_table,
    count_coefficients,
    dense_1d_views,
    group_by_device_and_dtype,
    host_coefficients,
    known_counts,
    math_dtype,
    note_counts,
    row_coefficients,
    stochastic_round_to_bf16,
)
from adamnx.schedule import check_betas, coefficients

__all__ = ["adamnx", "stochastic_round_to_bf16"]

# Devices where torch defaults to its foreach kernels; CPU keeps the for-loop, like torch.optim does.
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia", "hpu")


def adamnx(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    *,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    stochastic_rounding: bool = False,
    coord_steps: list[Tensor] | None = None,
) -> None:
    """Apply one AdamNX step to every tensor in ``params``, in place.

    See :class:`adamnx.AdamNX` for the algorithm and the meaning of each argument. ``state_steps`` holds one
    0-d step tensor per parameter (incremented here); ``grad_scale``/``found_inf`` come from a
    ``torch.amp.GradScaler`` and are only accepted by the fused implementation. ``exp_avgs``/``exp_avg_sqs``
    may be wider than the params (float32 state for bf16 params): the update is then computed in the state's
    precision and rounded once (stochastically with ``stochastic_rounding`` for bf16 params).
    ``coord_steps`` (one int32 tensor shaped like each param's real view, or None) switches on per-coordinate
    step counts (``per_coordinate_steps``), in every implementation.
    """
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` must be a list of 0-d step tensors, one per parameter")
    if fused is None and foreach is None:
        foreach = _default_to_foreach(params, differentiable)
        if foreach and isinstance(lr, Tensor) and not capturable:
            foreach = False  # torch.optim's rule: the for-loop takes a Tensor lr that foreach would refuse
    if isinstance(beta1, float) and isinstance(beta2, float):
        check_betas(beta1, beta2)  # before any counter advances: a step that raises changes nothing
    backend = BACKENDS[backend_name(fused, foreach, differentiable)]
    hp = Hyperparameters(beta1, beta2, lr, weight_decay, eps, maximize, stochastic_rounding)
    backend.step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        grad_scale,
        found_inf,
        hp,
        has_complex=has_complex,
        capturable=capturable,
        differentiable=differentiable,
        coord_steps=coord_steps,
    )


def backend_name(fused: bool | None, foreach: bool | None, differentiable: bool = False) -> str:
    """The row of ``BACKENDS`` that the flags select, once the default has set ``foreach`` (see :func:`adamnx`)."""
    if fused:
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot both be True")
        return "fused"
    if foreach:
        if differentiable:
            raise RuntimeError("`foreach` does not support `differentiable=True`")
        return "foreach"
    return "for-loop"


def backends_for(fused: bool | None, foreach: bool | None) -> list[Backend]:
    """The rows a group with these flags may run: one, or both defaults when neither flag is set (the default rule
    chooses by device at each step). A group's params and state_dtype must suit every one."""
    if fused is None and foreach is None:
        return [BACKENDS["for-loop"], BACKENDS["foreach"]]
    return [BACKENDS[backend_name(fused, foreach)]]


def _in_math_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` itself when it already has the math dtype (updated in place), else a copy to write back."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype, copy=True)


def _write_back(target: Tensor, updated: Tensor) -> None:
    """Round an updated copy into the state tensor it came from (nothing to do when it was updated in place)."""
    if updated is not target:
        target.copy_(updated)


def _default_to_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """torch.optim's rule: foreach when every param is a plain tensor on an accelerator, never when differentiable."""
    if differentiable or torch.jit.is_scripting():
        return False
    return all(p is None or (_is_plain_or_dtensor(p) and p.device.type in _FOREACH_DEFAULT_DEVICES) for p in params)


def _is_plain_or_dtensor(p: Tensor) -> bool:
    if type(p) in (Tensor, torch.nn.Parameter):
        return True
    return type(p).__name__ == "DTensor"


def _device_coefficients(step: Tensor, beta1: float, beta2: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """0-d coefficient tensors computed on the step's device (no host sync), cast to the math dtype."""
    w1, w2 = coefficients(step, (beta1, beta2))
    return w1.to(dtype), w2.to(dtype)


def _check_capturable_devices(params: list[Tensor], state_steps: list[Tensor]) -> None:
    if torch.compiler.is_compiling():
        return
    for p, step in zip(params, state_steps):
        if p.device != step.device:
            raise RuntimeError(
                "With capturable=True, params and state steps must be on the same device; "
                f"got a param on {p.device} and its step on {step.device}"
            )


def _reject_amp_scaling(grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("grad_scale/found_inf are only supported by fused=True")


def _single_tensor_adamnx(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hp: Hyperparameters,
    *,
    has_complex: bool,
    capturable: bool,
    differentiable: bool,
    coord_steps: list[Tensor] | None = None,
) -> None:
    beta1, beta2, lr, weight_decay, eps = hp.beta1, hp.beta2, hp.lr, hp.weight_decay, hp.eps
    maximize, stochastic_rounding = hp.maximize, hp.stochastic_rounding
    _reject_amp_scaling(grad_scale, found_inf)
    # On-device coefficients whenever reading the counter would sync the host or break a compiled graph.
    on_device = capturable or torch.compiler.is_compiling()
    if capturable:
        _check_capturable_devices(params, state_steps)
    if isinstance(lr, Tensor) and not on_device and not differentiable:  # differentiable: a graph to lr too
        lr = lr.item()
    if coord_steps is None:
        coord_steps = [None] * len(params)

    for param, grad, exp_avg, exp_avg_sq, step_t, coord_step in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, coord_steps
    ):
        if maximize:
            grad = -grad
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)

        guarded = coord_step is not None and not on_device  # per_coordinate_steps, coefficients read on the host
        known = known_counts(coord_step, step_t) if guarded else None  # before this step writes either
        step_t += 1
        dtype = math_dtype(param, exp_avg)
        step_lr = lr.to(dtype) if isinstance(lr, Tensor) else lr  # lr·λ formed in the math dtype, not lr's
        tensors = (param, grad, exp_avg, exp_avg_sq)
        stochastic = stochastic_rounding and param.dtype == torch.bfloat16
        wider = stochastic or param.dtype != dtype or exp_avg.dtype != dtype  # math wider than the tensors hold
        exceptions = None
        if guarded:
            step = step_t.item()
            counts = advance_known_counts_(coord_step, grad, known, step)
            note_counts(coord_step, step_t, *counts)
            pieces, exceptions = _guarded_pieces(
                tensors, coord_step, counts, step, beta1, beta2, dtype, wider=wider, differentiable=differentiable
            )
        else:
            if coord_step is not None:  # on the device: every coordinate's coefficients evaluated in the graph
                w1, w2 = _device_coefficients(advance_counts_(coord_step, grad, True).clamp_min(1), beta1, beta2, dtype)
            elif on_device:
                w1, w2 = _device_coefficients(step_t, beta1, beta2, dtype)
            else:
                w1, w2 = host_coefficients(step_t.item(), beta1, beta2)
            pieces = [(tensors, (w1, 1 - w2, w2))]
        if differentiable:
            _differentiable_update(*tensors, *pieces[0][1], step_lr, weight_decay, eps, dtype)
            continue

        if wider:
            if len(pieces) == 1:  # not yet cut: bounded temporaries (see _piece_size)
                pieces = _in_pieces(*pieces[0])
            for piece, coefficients_of_piece in pieces:
                _update_copies(*piece, *coefficients_of_piece, dtype, step_lr, weight_decay, eps, stochastic)
        else:
            for piece, coefficients_of_piece in pieces:
                _update_in_place(*piece, *coefficients_of_piece, step_lr, weight_decay, eps)
            if exceptions is not None:
                exceptions.update(step_lr, weight_decay, eps)


def _guarded_pieces(tensors, count, counts, step, beta1, beta2, dtype, *, wider, differentiable):
    """(piece, coefficients) pairs of one tensor with per-coordinate counts (already advanced, varying as
    ``counts`` says), and the _Exceptions to update after them, or None.

    The tensor's own coefficients when its counts equal its step (its exceptions then updated apart); one set
    per row (broadcast) when counts are constant along rows; else one per element, piece by piece. Wider math and
    differentiable updates work on copies: they take per-element coefficients but for exception-free ON_STEP."""
    in_place = not (wider or differentiable)
    if counts.kind == ON_STEP and (counts.exceptions is None or in_place):
        exceptions = None
        if counts.exceptions is not None:
            source = _table_source(step, [count], beta1, beta2, dtype, tensors[0].device)
            exceptions = _Exceptions.save(tensors, count, counts.exceptions, *source, dtype)
        if counts.exceptions is None or exceptions is not None:
            w1, w2 = host_coefficients(step, beta1, beta2)
            return [(tensors, (w1, 1 - w2, w2))], exceptions
    source, clamp = _table_source(step, [count], beta1, beta2, dtype, tensors[0].device)
    if counts.kind == BY_ROW and in_place:
        return [(tensors, row_coefficients(source, counts.rows, dtype, clamp, count.dim()))], None
    cut = [(tensors, (count,))] if differentiable else _in_pieces(tensors, (count,))
    return [(piece, count_coefficients(source, c, dtype, clamp)) for piece, (c,) in cut], None


def _table_source(max_step, counts, beta1, beta2, dtype, device):
    """What count_coefficients reads for ``counts`` (each at most ``max_step``): the table, or the betas when the
    counts are too long for one; and whether a count may lie past the table's end (a complete table)."""
    table = coordinate_table(max_step, counts, beta1, beta2, dtype, device)
    source = (beta1, beta2) if table is None else table
    return source, table is not None and table.shape[1] <= max_step


class _Exceptions:
    """The coordinates of an ON_STEP tensor whose count is not its step: copied before the tensor's update (which
    gives every coordinate the tensor's coefficients), then updated with their own and written back."""

    def __init__(self, gathered: GatheredCoordinates, coefficients: tuple[Tensor, Tensor, Tensor]) -> None:
        self.gathered, self.coefficients = gathered, coefficients

    @classmethod
    def save(cls, tensors, count, indices, source, clamp, dtype):
        """None when the tensors and counts are not dense blocks of one layout (flat indices need one)."""
        gathered = GatheredCoordinates.save([*tensors, count], indices)
        if gathered is None:
            return None
        return cls(gathered, count_coefficients(source, gathered.copies[4], dtype, clamp))

    def update(self, lr, weight_decay, eps) -> None:
        _update_in_place(*self.gathered.copies[:4], *self.coefficients, lr, weight_decay, eps)
        self.gathered.write_back(counts=False)  # the counts advanced already


def _update_in_place(param, grad, exp_avg, exp_avg_sq, w1, beta2_hat, w2, lr, weight_decay, eps) -> None:
    """The update of one tensor whose param, grad and moments all have the math dtype."""
    _decay_(param, lr, weight_decay)
    _update_moments_(exp_avg, exp_avg_sq, grad, w1, beta2_hat, w2)
    _descend_(param, exp_avg, exp_avg_sq.sqrt().add_(eps), lr)


def _update_copies(param, grad, exp_avg, exp_avg_sq, w1, beta2_hat, w2, dtype, lr, weight_decay, eps, stochastic):
    """The same update computed on copies in the wider math ``dtype`` and rounded once into the tensors.

    The moments are rounded and stored before the param's copy exists, and √v + ε reuses v's copy: three
    temporaries of the math dtype at a time (callers pass pieces, see _piece_size)."""
    g = grad.to(dtype)
    m, v = _in_math_dtype(exp_avg, dtype), _in_math_dtype(exp_avg_sq, dtype)  # float32 state: in place
    _update_moments_(m, v, g, w1, beta2_hat, w2)
    del g
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)
    denom = (v.sqrt_() if v is not exp_avg_sq else v.sqrt()).add_(eps)
    theta = param.to(dtype, copy=True)
    _decay_(theta, lr, weight_decay)
    _descend_(theta, m, denom, lr)
    param.copy_(stochastic_round_to_bf16(theta) if stochastic else theta)


def _decay_(theta: Tensor, lr, weight_decay: float) -> None:
    """θ ← θ(1 − ηλ), written as θ + (−ηλ)θ: the small factor −ηλ keeps its digits in float32, 1 − ηλ doesn't."""
    if weight_decay == 0:
        return
    if isinstance(lr, Tensor):
        theta.addcmul_(theta, lr * -weight_decay)
    else:
        theta.add_(theta, alpha=-lr * weight_decay)


def _update_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, w1, beta2_hat, w2) -> None:
    """m ← lerp(m, g, 1 − β1_t); v ← v·β̂2_t + (1 − β̂2_t)·g², with w1 = 1 − β1_t and w2 = 1 − β̂2_t."""
    exp_avg.lerp_(grad, w1)
    # β̂2_t = 1 − w2 is formed from the stable w2; w2 itself multiplies g² at full relative accuracy.
    exp_avg_sq.mul_(beta2_hat)
    if isinstance(w2, Tensor):
        exp_avg_sq.addcmul_(grad, grad * w2)
    else:
        exp_avg_sq.addcmul_(grad, grad, value=w2)


def _descend_(theta: Tensor, exp_avg: Tensor, denom: Tensor, lr) -> None:
    """θ ← θ − η·m/(√v + ε), given denom = √v + ε (overwritten when lr is a Tensor)."""
    if isinstance(lr, Tensor):
        theta.addcdiv_(exp_avg, denom.div_(-lr))
    else:
        theta.addcdiv_(exp_avg, denom, value=-lr)


# Elements per piece of a wider-math update (three float32 copies of a piece exist at a time). On the CPU small
# pieces stay in cache (12 MB) and are faster than whole tensors; an accelerator pays ~12 launches per piece, so
# its pieces are larger (768 MB of temporaries at most).
_PIECE = {"cpu": 1 << 20}
_ACCELERATOR_PIECE = 1 << 26


def _piece_size(tensor: Tensor) -> int:
    return _PIECE.get(tensor.device.type, _ACCELERATOR_PIECE)


def _in_pieces(tensors: tuple[Tensor, ...], coefficients: tuple) -> list[tuple[tuple[Tensor, ...], tuple]]:
    """Aligned 1-D pieces of at most _PIECE elements of ``tensors`` (which share a layout) and of the coefficients
    shaped like them (per-coordinate steps); the tensors whole when they are small or not one dense block."""
    shaped = [i for i, c in enumerate(coefficients) if isinstance(c, Tensor) and c.dim()]
    piece = _piece_size(tensors[0])
    views = dense_1d_views([*tensors, *(coefficients[i] for i in shaped)]) if tensors[0].numel() > piece else None
    if views is None:
        return [(tensors, coefficients)]
    pieces = []
    for start in range(0, tensors[0].numel(), piece):
        sliced = [view[start : start + piece] for view in views]
        coeffs = list(coefficients)
        for i, coefficient_piece in zip(shaped, sliced[len(tensors) :]):
            coeffs[i] = coefficient_piece
        pieces.append((tuple(sliced[: len(tensors)]), tuple(coeffs)))
    return pieces


def _differentiable_update(param, grad, exp_avg, exp_avg_sq, w1, beta2_hat, w2, lr, weight_decay, eps, dtype):
    """The same update, out of place, so that autograd can run back through many steps.

    In-place updates would overwrite values that an earlier step saved for backward ("modified by an inplace
    operation"): every quantity is computed from clones and written back with copy_, which saves nothing.
    """
    theta, m, v, g = (t.to(dtype, copy=True) for t in (param, exp_avg, exp_avg_sq, grad))
    if weight_decay != 0:
        theta = theta + (lr * -weight_decay) * theta
    m = torch.lerp(m, g, w1)
    v = v * beta2_hat + (g * g) * w2
    theta = theta - lr * (m / (v.sqrt() + eps))
    param.copy_(theta)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _multi_tensor_adamnx(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hp: Hyperparameters,
    *,
    has_complex: bool,
    capturable: bool,
    differentiable: bool,
    coord_steps: list[Tensor] | None = None,
) -> None:
    beta1, beta2, lr, weight_decay, eps = hp.beta1, hp.beta2, hp.lr, hp.weight_decay, hp.eps
    maximize, stochastic_rounding = hp.maximize, hp.stochastic_rounding
    if len(params) == 0:
        return
    _reject_amp_scaling(grad_scale, found_inf)
    on_device = capturable or torch.compiler.is_compiling()
    if isinstance(lr, Tensor) and not capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if capturable:
        _check_capturable_devices(params, state_steps)

    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, *([coord_steps] if coord_steps is not None else []))
    for d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps, *d_counts in group_by_device_and_dtype(*lists):
        if has_complex:
            d_params, d_grads, d_exp_avgs, d_exp_avg_sqs = (
                [torch.view_as_real(t) if torch.is_complex(t) else t for t in lst]
                for lst in (d_params, d_grads, d_exp_avgs, d_exp_avg_sqs)
            )
        if maximize:
            d_grads = torch._foreach_neg(d_grads)

        dtype = math_dtype(d_params[0], d_exp_avgs[0])
        guarded = bool(d_counts) and not on_device  # per_coordinate_steps, coefficients read on the host
        knowns = [known_counts(c, s) for c, s in zip(d_counts[0], d_steps)] if guarded else []
        torch._foreach_add_(d_steps, 1.0)
        tensors = (d_params, d_grads, d_exp_avgs, d_exp_avg_sqs)
        stochastic = stochastic_rounding and d_params[0].dtype == torch.bfloat16
        wider = stochastic or d_params[0].dtype != dtype or d_exp_avgs[0].dtype != dtype  # math wider than stored
        exceptions = []
        if guarded:
            buckets, exceptions = _guarded_buckets(tensors, d_counts[0], d_steps, knowns, beta1, beta2, dtype, wider)
        else:
            if d_counts:  # on the device: every coordinate's coefficients evaluated in the graph
                shaped = [
                    _device_coefficients(advance_counts_(c, g, True).clamp_min(1), beta1, beta2, dtype)
                    for c, g in zip(d_counts[0], d_grads)
                ]
                w1, w2 = [w for w, _ in shaped], [w for _, w in shaped]
                beta2_hat = [1 - w for w in w2]
            elif on_device:
                # One vectorised evaluation for the whole group: N 0-d weights, no host sync.
                w1, w2 = _device_coefficients(torch.stack(d_steps), beta1, beta2, dtype)
                w1, beta2_hat, w2 = list(w1.unbind()), list((1 - w2).unbind()), list(w2.unbind())
            else:
                pairs = [host_coefficients(s.item(), beta1, beta2) for s in d_steps]
                w1, w2 = [p[0] for p in pairs], [p[1] for p in pairs]
                beta2_hat = [1 - x for x in w2]
            coefficient_lists = (w1, beta2_hat, w2)
            buckets = _buckets_of_pieces(tensors, coefficient_lists) if wider else [(*tensors, *coefficient_lists)]

        group_lr = lr.to(dtype) if isinstance(lr, Tensor) else lr  # lr·λ formed in the math dtype, not lr's
        for bucket in buckets:
            if wider:
                _foreach_update_copies(*bucket, dtype, group_lr, weight_decay, eps, stochastic)
            else:
                _foreach_update_in_place(*bucket, group_lr, weight_decay, eps)
        for tensor_exceptions in exceptions:  # after their tensors' updates, which they overwrite
            tensor_exceptions.update(group_lr, weight_decay, eps)


def _guarded_buckets(tensors, counts, steps, knowns, beta1, beta2, dtype, wider):
    """per_coordinate_steps on the host: advance every count, then buckets of tensors with their coefficients (as
    _guarded_pieces, for lists), and the _Exceptions to update after the buckets.

    The tensors whose counts equal their step take their own coefficients, as without the guard; those whose
    counts are constant along rows one set per row; the rest go piece by piece (bounded temporaries), with each
    piece's coefficients gathered from the table by count."""
    step_values = [s.item() for s in steps]
    advanced = []
    for count, grad, known, step, step_t in zip(counts, tensors[1], knowns, step_values, steps):
        advanced.append(advance_known_counts_(count, grad, known, step))
        note_counts(count, step_t, *advanced[-1])
    source = clamp = None
    if any(c.kind != ON_STEP or c.exceptions is not None for c in advanced):  # a count may not be its step
        max_step = max(step_values)  # a coordinate's count is at most its tensor's step
        source, clamp = _table_source(max_step, counts, beta1, beta2, dtype, tensors[0][0].device)
    exceptions, own, by_row, by_element = [], [], [], []
    for i, (count, tensor_counts) in enumerate(zip(counts, advanced)):
        if tensor_counts.kind == ON_STEP and tensor_counts.exceptions is not None and not wider:
            saved = _Exceptions.save([t[i] for t in tensors], count, tensor_counts.exceptions, source, clamp, dtype)
            if saved is not None:
                exceptions.append(saved)
                own.append(i)
                continue
        if tensor_counts.kind == ON_STEP and tensor_counts.exceptions is None:
            own.append(i)
        elif tensor_counts.kind == BY_ROW and not wider:  # wider: bounded pieces need per-element weights
            by_row.append(i)
        else:
            by_element.append(i)

    def select(indices):
        return tuple([lst[i] for i in indices] for lst in tensors)

    buckets = []
    if own:
        pairs = [host_coefficients(step_values[i], beta1, beta2) for i in own]
        weights = ([w1 for w1, _ in pairs], [1 - w2 for _, w2 in pairs], [w2 for _, w2 in pairs])
        buckets += _buckets_of_pieces(select(own), weights) if wider else [(*select(own), *weights)]
    if by_row:
        rows = [row_coefficients(source, advanced[i].rows, dtype, clamp, counts[i].dim()) for i in by_row]
        buckets.append((*select(by_row), *map(list, zip(*rows))))
    if by_element:
        for *pieces, piece_counts in _buckets_of_pieces(select(by_element), ([counts[i] for i in by_element],)):
            gathered = [count_coefficients(source, c, dtype, clamp) for c in piece_counts]
            buckets.append((*pieces, *map(list, zip(*gathered))))
    return buckets, exceptions


def _foreach_update_in_place(params, grads, exp_avgs, exp_avg_sqs, w1, beta2_hat, w2, lr, weight_decay, eps):
    """_update_in_place for lists of tensors that all have the math dtype."""
    _foreach_decay_(params, lr, weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, w1)
    _foreach_second_moment_(exp_avg_sqs, grads, beta2_hat, w2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    _foreach_descend_(params, exp_avgs, denom, lr)


def _foreach_update_copies(
    params, grads, exp_avgs, exp_avg_sqs, w1, beta2_hat, w2, dtype, lr, weight_decay, eps, stochastic
) -> None:
    """_update_copies for lists of tensors (pieces of at most a piece's elements in all): the same order, so the
    same three temporaries of the math dtype at a time."""
    gs = [g.to(dtype) for g in grads]
    ms, vs = [_in_math_dtype(m, dtype) for m in exp_avgs], [_in_math_dtype(v, dtype) for v in exp_avg_sqs]
    torch._foreach_lerp_(ms, gs, w1)
    _foreach_second_moment_(vs, gs, beta2_hat, w2)
    del gs
    for targets, values in ((exp_avgs, ms), (exp_avg_sqs, vs)):
        for target, value in zip(targets, values):
            _write_back(target, value)
    denom = [v.sqrt_() if v is not stored else v.sqrt() for v, stored in zip(vs, exp_avg_sqs)]
    torch._foreach_add_(denom, eps)
    thetas = [p.to(dtype, copy=True) for p in params]
    _foreach_decay_(thetas, lr, weight_decay)
    _foreach_descend_(thetas, ms, denom, lr)
    for param, theta in zip(params, thetas):
        param.copy_(stochastic_round_to_bf16(theta) if stochastic else theta)


def _foreach_decay_(thetas, lr, weight_decay: float) -> None:
    if weight_decay == 0:
        return
    if isinstance(lr, Tensor):
        torch._foreach_add_(thetas, torch._foreach_mul(thetas, lr * -weight_decay))
    else:
        torch._foreach_add_(thetas, thetas, alpha=-lr * weight_decay)


def _foreach_second_moment_(exp_avg_sqs, grads, beta2_hat, w2) -> None:
    """v ← v·β̂2_t + (1 − β̂2_t)·g², with per-tensor weights (floats, or 0-d tensors on the device)."""
    torch._foreach_mul_(exp_avg_sqs, beta2_hat)
    if isinstance(w2[0], Tensor):
        scaled_grads = torch._foreach_mul(grads, w2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, scaled_grads)
    else:
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, w2)


def _foreach_descend_(thetas, exp_avgs, denom, lr) -> None:
    if isinstance(lr, Tensor):
        torch._foreach_div_(denom, -lr)
        torch._foreach_addcdiv_(thetas, exp_avgs, denom)
    else:
        torch._foreach_addcdiv_(thetas, exp_avgs, denom, -lr)


def _buckets_of_pieces(tensors: tuple[list[Tensor], ...], coefficients: tuple[list, ...]):
    """Lists of pieces (see _in_pieces) with their per-tensor coefficients, at most a piece's elements per list."""
    bucket: list[tuple] = []
    size, budget = 0, _piece_size(tensors[0][0])
    for i in range(len(tensors[0])):
        for piece, coeffs in _in_pieces(tuple(lst[i] for lst in tensors), tuple(c[i] for c in coefficients)):
            if bucket and size + piece[0].numel() > budget:
                yield tuple(map(list, zip(*bucket)))
                bucket, size = [], 0
            bucket.append((*piece, *coeffs))
            size += piece[0].numel()
    if bucket:
        yield tuple(map(list, zip(*bucket)))


# The implementations, by name (see the module docstring and adamnx._backends for how to add one).
BACKENDS: dict[str, Backend] = {
    "for-loop": Backend(_single_tensor_adamnx, {"foreach": False}, capturable=True),
    "foreach": Backend(_multi_tensor_adamnx, {"foreach": True}, capturable=True),
    "fused": Backend(
        fused_adamnx, {"fused": True}, devices=tuple(FUSED_KERNELS), dtypes=FLOATING_DTYPES, prepare=prepare_fused
    ),
}
