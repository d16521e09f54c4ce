"""Functional AdamNX: :func:`adamnx` and its for-loop, multi-tensor (foreach) and fused implementations.

Shaped like ``torch.optim.adamw.adamw``: it takes flat lists of tensors and updates them in place.
Every implementation takes its coefficients from :func:`adamnx.schedule.coefficients`.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import Tensor

from adamnx.schedule import coefficients

__all__ = ["adamnx"]

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
    ``coord_steps`` (one int32 tensor shaped like each param, or None) switches on per-coordinate step counts
    (``per_coordinate_steps``); it runs the for-loop implementation, whatever ``foreach``/``fused`` say.
    """
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` must be a list of 0-d step tensors, one per parameter")
    if fused is None and foreach is None:
        foreach = _default_to_foreach(params, differentiable)
    if coord_steps is not None:
        # Per-element coefficients are computed by the for-loop path only: one implementation of that math.
        fused, foreach = False, False
    if fused:
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot both be True")
        from adamnx._fused import fused_adamnx as impl
    elif foreach:
        if differentiable:
            raise RuntimeError("`foreach` does not support `differentiable=True`")
        impl = _multi_tensor_adamnx
    else:
        impl = functools.partial(_single_tensor_adamnx, coord_steps=coord_steps)
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        grad_scale,
        found_inf,
        has_complex=has_complex,
        capturable=capturable,
        differentiable=differentiable,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        stochastic_rounding=stochastic_rounding,
    )


def stochastic_round_to_bf16(x: Tensor) -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: up with probability equal to the distance to the lower value.

    Adds 16 random bits below bf16's last mantissa bit, then truncates; unbiased (E[round(x)] = x), so updates
    smaller than half a bf16 ulp still move the parameter on average instead of being rounded away.
    """
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits 0: the cast is exact


def _master(param: Tensor, state_dtype: torch.dtype, stochastic: bool) -> Tensor:
    """The tensor the update is computed in: the param itself, or a wider copy (written back by _write_back)."""
    if param.dtype == state_dtype and not stochastic:
        return param
    return param.to(torch.promote_types(state_dtype, torch.float32))


def _write_back(param: Tensor, master: Tensor, stochastic: bool) -> None:
    if master is not param:
        param.copy_(stochastic_round_to_bf16(master) if stochastic else master)


def _advance_coord_steps(coord_step: Tensor, grad: Tensor) -> Tensor:
    """Per-coordinate counts: a coordinate starts counting at its first non-zero gradient; returns max(count, 1)."""
    started = (coord_step > 0) | (grad != 0)
    coord_step.copy_(torch.where(started, coord_step + 1, 0))
    return coord_step.clamp_min(1)


def _default_to_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """torch.optim's rule: foreach when every param is a plain tensor on an accelerator, never when differentiable."""
    if differentiable or torch.jit.is_scripting():
        return False
    return all(p is None or (_is_plain_or_dtensor(p) and p.device.type in _FOREACH_DEFAULT_DEVICES) for p in params)


def _is_plain_or_dtensor(p: Tensor) -> bool:
    if type(p) in (Tensor, torch.nn.Parameter):
        return True
    return type(p).__name__ == "DTensor"


@functools.lru_cache(maxsize=4096)
def host_coefficients(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Python-float coefficients for a step read from a CPU counter; cached since a group shares its step."""
    return tuple(coefficients(step, (beta1, beta2)))


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
    *,
    has_complex: bool,
    capturable: bool,
    differentiable: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    stochastic_rounding: bool,
    coord_steps: list[Tensor] | None = None,
) -> None:
    _reject_amp_scaling(grad_scale, found_inf)
    # On-device coefficients whenever reading the counter would sync the host or break a compiled graph.
    on_device = capturable or torch.compiler.is_compiling()
    if capturable:
        _check_capturable_devices(params, state_steps)
    if isinstance(lr, Tensor) and not on_device:
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

        step_t += 1
        stochastic = stochastic_rounding and param.dtype == torch.bfloat16
        master = _master(param, exp_avg.dtype, stochastic)
        if grad.dtype != exp_avg.dtype:
            grad = grad.to(exp_avg.dtype)  # float32 state for low-precision params: float32 math

        per_element = coord_step is not None
        if per_element:  # per_coordinate_steps: every coordinate follows the schedule from its own first gradient
            w1, w2 = _device_coefficients(_advance_coord_steps(coord_step, grad), beta1, beta2, exp_avg.dtype)
        elif on_device:
            w1, w2 = _device_coefficients(step_t, beta1, beta2, exp_avg.dtype)
        else:
            w1, w2 = host_coefficients(step_t.item(), beta1, beta2)

        if weight_decay != 0:
            # θ ← θ(1 − ηλ) written as θ + (−ηλ)θ: the small factor −ηλ keeps its digits in float32, 1 − ηλ doesn't.
            if isinstance(lr, Tensor):
                master.addcmul_(master, lr * -weight_decay)
            else:
                master.add_(master, alpha=-lr * weight_decay)
        exp_avg.lerp_(grad, w1)
        # β̂2_t = 1 − w2 is formed from the stable w2; w2 itself multiplies g² at full relative accuracy.
        exp_avg_sq.mul_(1 - w2)
        if on_device or per_element:
            exp_avg_sq.addcmul_(grad, grad * w2)
        else:
            exp_avg_sq.addcmul_(grad, grad, value=w2)
        # autograd saves sqrt's output, so the differentiable step must not add eps in place
        denom = exp_avg_sq.sqrt() + eps if differentiable else exp_avg_sq.sqrt().add_(eps)
        if isinstance(lr, Tensor):
            master.addcdiv_(exp_avg, denom.div_(-lr))
        else:
            master.addcdiv_(exp_avg, denom, value=-lr)
        _write_back(param, master, stochastic)


def group_by_device_and_dtype(*tensor_lists: list[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists into sublists whose param shares a device and dtype (foreach kernels need that)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(tensor_lists[0]):
        buckets[(p.device, p.dtype)].append(i)
    return [tuple([lst[i] for i in idx] for lst in tensor_lists) for idx in buckets.values()]


def _multi_tensor_adamnx(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    has_complex: bool,
    capturable: bool,
    differentiable: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    stochastic_rounding: bool,
) -> None:
    if len(params) == 0:
        return
    _reject_amp_scaling(grad_scale, found_inf)
    on_device = capturable or torch.compiler.is_compiling()
    if isinstance(lr, Tensor) and not capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if capturable:
        _check_capturable_devices(params, state_steps)

    for d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps in group_by_device_and_dtype(
        params, grads, exp_avgs, exp_avg_sqs, state_steps
    ):
        if has_complex:
            d_params, d_grads, d_exp_avgs, d_exp_avg_sqs = (
                [torch.view_as_real(t) if torch.is_complex(t) else t for t in lst]
                for lst in (d_params, d_grads, d_exp_avgs, d_exp_avg_sqs)
            )
        if maximize:
            d_grads = torch._foreach_neg(d_grads)

        torch._foreach_add_(d_steps, 1.0)
        if on_device:
            # One vectorised evaluation for the whole group: N 0-d weights, no host sync.
            w1, w2 = _device_coefficients(torch.stack(d_steps), beta1, beta2, d_exp_avgs[0].dtype)
            w1, beta2_hat, w2 = list(w1.unbind()), list((1 - w2).unbind()), list(w2.unbind())
        else:
            pairs = [host_coefficients(s.item(), beta1, beta2) for s in d_steps]
            w1, w2 = [p[0] for p in pairs], [p[1] for p in pairs]
            beta2_hat = [1 - x for x in w2]

        state_dtype = d_exp_avgs[0].dtype
        stochastic = stochastic_rounding and d_params[0].dtype == torch.bfloat16
        masters = [_master(p, state_dtype, stochastic) for p in d_params]
        if d_grads[0].dtype != state_dtype:
            d_grads = [g.to(state_dtype) for g in d_grads]

        if weight_decay != 0:
            if isinstance(lr, Tensor):
                torch._foreach_add_(masters, torch._foreach_mul(masters, lr * -weight_decay))
            else:
                torch._foreach_add_(masters, masters, alpha=-lr * weight_decay)
        torch._foreach_lerp_(d_exp_avgs, d_grads, w1)
        torch._foreach_mul_(d_exp_avg_sqs, beta2_hat)
        if on_device:
            scaled_grads = torch._foreach_mul(d_grads, w2)
            torch._foreach_addcmul_(d_exp_avg_sqs, d_grads, scaled_grads)
            del scaled_grads  # one temporary at a time
        else:
            torch._foreach_addcmul_(d_exp_avg_sqs, d_grads, d_grads, w2)
        del d_grads

        denom = torch._foreach_sqrt(d_exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        if isinstance(lr, Tensor):
            torch._foreach_div_(denom, -lr)
            torch._foreach_addcdiv_(masters, d_exp_avgs, denom)
        else:
            torch._foreach_addcdiv_(masters, d_exp_avgs, denom, -lr)
        for p, master in zip(d_params, masters):
            _write_back(p, master, stochastic)
