r"""The AdamNX update of one tensor, written once in torch ops (and once in ``_foreach_`` ops for lists).

.. math::
    \theta \leftarrow \theta + (-\eta\lambda)\,\theta, \quad
    m \leftarrow \operatorname{lerp}(m, g, 1-\beta_{1,t}), \quad
    v \leftarrow \hat\beta_{2,t}\, v + (1-\hat\beta_{2,t})\, g^2, \quad
    \theta \leftarrow \theta - \eta\, m / (\sqrt{v} + \epsilon)

:func:`update` is what the for-loop, capturable, differentiable and ``torch.compile`` paths run, and what the
accelerator kernel (``backends/fused_inductor.py``) compiles; :func:`foreach_update` is the same update for lists of
tensors (``_foreach_`` kernels). The C++ kernel's ``adamnx_update`` (``backends/csrc/fused_cpu.cpp``) is the third and
last copy. The coefficients ``(1 − β1_t, β̂2_t, 1 − β̂2_t)`` come from :func:`adamnx.schedule.coefficients`, as Python
floats or tensors (0-d, per row or per element): what an executor hands in, this module only applies.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NOISE_PERIOD",
    "Weights",
    "foreach_update",
    "foreach_update_copies",
    "math_dtype",
    "moment_noise",
    "moments_in_state_dtype",
    "stochastic_round_to_bf16",
    "update",
    "update_copies",
]


class Weights(NamedTuple):
    """The coefficients of an update, ``(1 − β1_t, β̂2_t, 1 − β̂2_t)``: Python floats, tensors (0-d, per row or per
    element), or, for :func:`foreach_update`, lists of either (one per tensor)."""

    one_minus_beta1_t: Any
    beta2_hat: Any
    one_minus_beta2_hat: Any


def _same(t: Tensor) -> Tensor:
    return t


def _new(t: Tensor) -> None:
    return None


def update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weights: Weights,
    lr: Any,
    weight_decay: Any,
    eps: Any,
    *,
    in_place: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """One AdamNX step of one tensor whose param, grad and moments all have the math dtype; returns (θ, m, v).

    ``in_place``: writes ``param``, ``exp_avg`` and ``exp_avg_sq`` (and returns them); otherwise returns new tensors,
    which autograd can run back through (``differentiable=True``) and the compiler can fuse. Both run the same ops,
    so both give the same bits. The weights, ``lr`` and ``weight_decay`` are Python floats or tensors (0-d, or
    shaped to broadcast over the param: per row or per element).
    """
    one_minus_beta1_t, beta2_hat, one_minus_beta2_hat = weights
    out = _same if in_place else _new
    # θ ← θ + (−ηλ)θ: the small factor −ηλ keeps its digits in float32, 1 − ηλ would not.
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        if isinstance(lr, Tensor) or isinstance(weight_decay, Tensor):
            param = torch.addcmul(param, param, lr * -weight_decay, out=out(param))
        else:
            param = torch.add(param, param, alpha=-lr * weight_decay, out=out(param))
    exp_avg = torch.lerp(exp_avg, grad, one_minus_beta1_t, out=out(exp_avg))
    # β̂2_t = 1 − (1 − β̂2_t) is formed from the stable weight; the weight itself multiplies g² at full accuracy.
    exp_avg_sq = torch.mul(exp_avg_sq, beta2_hat, out=out(exp_avg_sq))
    if isinstance(one_minus_beta2_hat, Tensor):
        exp_avg_sq = torch.addcmul(exp_avg_sq, grad, grad * one_minus_beta2_hat, out=out(exp_avg_sq))
    else:
        exp_avg_sq = torch.addcmul(exp_avg_sq, grad, grad, value=one_minus_beta2_hat, out=out(exp_avg_sq))
    denom = exp_avg_sq.sqrt()
    denom = torch.add(denom, eps, out=out(denom))
    if isinstance(lr, Tensor):
        param = torch.addcdiv(param, exp_avg, torch.div(denom, -lr, out=out(denom)), out=out(param))
    else:
        param = torch.addcdiv(param, exp_avg, denom, value=-lr, out=out(param))
    return param, exp_avg, exp_avg_sq


def update_copies(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weights: Weights,
    lr: Any,
    weight_decay: Any,
    eps: Any,
    *,
    dtype: torch.dtype,
    stochastic: bool = False,
    differentiable: bool = False,
    noise: Tensor | None = None,
) -> None:
    """:func:`update` computed on copies in the math ``dtype`` and rounded once into the tensors (stochastically to
    bf16 params with ``stochastic``; bf16 moments always, with ``noise``'s bits when given). Moments already in the
    math dtype are updated in place. ``differentiable``: every input is copied and the update runs out of place, so
    that the write-back overwrites nothing autograd saved.
    """
    theta = param.to(dtype, copy=True)
    g, m, v = (t.to(dtype, copy=differentiable) for t in (grad, exp_avg, exp_avg_sq))
    theta, m, v = update(theta, g, m, v, weights, lr, weight_decay, eps, in_place=not differentiable)
    _write_back(param, exp_avg, exp_avg_sq, theta, m, v, stochastic, noise)


def foreach_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    weights: Weights,
    lr: Any,
    weight_decay: float,
    eps: float,
) -> None:
    """:func:`update` for lists of tensors that share a device and have the math dtype, in place, with one
    ``_foreach_`` kernel per operation. The weights are lists (one per tensor) of floats or of tensors."""
    one_minus_beta1_t, beta2_hat, one_minus_beta2_hat = weights
    if weight_decay != 0:
        if isinstance(lr, Tensor):
            torch._foreach_add_(params, torch._foreach_mul(params, lr * -weight_decay))
        else:
            torch._foreach_add_(params, params, alpha=-lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, one_minus_beta1_t)
    torch._foreach_mul_(exp_avg_sqs, beta2_hat)
    if isinstance(one_minus_beta2_hat[0], Tensor):
        torch._foreach_addcmul_(exp_avg_sqs, grads, torch._foreach_mul(grads, one_minus_beta2_hat))
    else:
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, one_minus_beta2_hat)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if isinstance(lr, Tensor):
        torch._foreach_div_(denom, -lr)
        torch._foreach_addcdiv_(params, exp_avgs, denom)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denom, -lr)


def foreach_update_copies(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    weights: Weights,
    lr: Any,
    weight_decay: float,
    eps: float,
    *,
    dtype: torch.dtype,
    stochastic: bool = False,
    noise: Tensor | None = None,
) -> None:
    """:func:`foreach_update` computed on copies in the math ``dtype``, as :func:`update_copies` (callers pass lists
    of pieces, so that the copies stay bounded)."""
    thetas = [p.to(dtype, copy=True) for p in params]
    gs = [g.to(dtype) for g in grads]
    ms, vs = [m.to(dtype) for m in exp_avgs], [v.to(dtype) for v in exp_avg_sqs]
    foreach_update(thetas, gs, ms, vs, weights, lr, weight_decay, eps)
    for i, param in enumerate(params):  # tensor by tensor: the for-loop's order of random draws
        _write_back(param, exp_avgs[i], exp_avg_sqs[i], thetas[i], ms[i], vs[i], stochastic, noise)


def _write_back(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    theta: Tensor,
    m: Tensor,
    v: Tensor,
    stochastic: bool,
    noise: Tensor | None,
) -> None:
    """A tensor's update, computed in the math dtype, rounded into its param and moments (moments computed in
    place need no write)."""
    if m is not exp_avg:
        m, v = moments_in_state_dtype(m, v, exp_avg.dtype, noise)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    param.copy_(stochastic_round_to_bf16(theta) if stochastic else theta)


def stochastic_round_to_bf16(x: Tensor, noise: Tensor | None = None) -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: up with probability equal to the distance to the lower value.

    Adds 16 random bits below bf16's last mantissa bit, then truncates; unbiased (E[round(x)] = x), so updates
    smaller than half a bf16 ulp still move the value on average instead of being rounded away. ``noise``: int32
    shaped like ``x``, uniform in [0, 2^16) (drawn here when not given). Autograd sees the rounding as the identity.
    """
    value = x.detach()
    bits = value.to(torch.float32).view(torch.int32)  # float64 math (a float64 state): to float32 first (nearest)
    if noise is None:
        noise = torch.randint_like(bits, 0, 1 << 16)
    # A carry never leaves an inf (its low 16 bits are 0), but can leave a NaN's payload (making it ±0): NaNs are
    # kept as they are. ``noise`` may broadcast against ``x`` (see moments_in_state_dtype).
    rounded = ((bits + noise) & -65536).view(torch.float32)  # low 16 bits 0: the cast to bf16 below is exact
    rounded = torch.where(value.isnan(), value.to(torch.float32), rounded)
    if x.requires_grad:  # differentiable=True: the gradient passes through the rounding unchanged
        return (x + (rounded.to(x.dtype) - value)).to(torch.bfloat16)
    return rounded.to(torch.bfloat16)


# The period of a step's shared random bits (see moment_noise): a divisor of every piece size (adamnx.backends._pieces),
# so that a tensor cut in pieces draws what it draws whole.
NOISE_PERIOD = 4096


def moment_noise(device: torch.device) -> Tensor:
    """One step's random bits for the stochastic rounding of bf16 moments, shared by the tensors of a bucket: element
    ``i`` of each tensor draws ``noise[i mod 4096]``. Each element's draw is uniform and fresh every step, so the
    rounding stays unbiased; drawing 4,096 values instead of one per element matters on the CPU, whose generator
    is serial (2–3 ns a value: more than the rest of the update)."""
    return torch.randint(-(1 << 31), 1 << 31, (NOISE_PERIOD,), dtype=torch.int32, device=device)


def moments_in_state_dtype(
    exp_avg: Tensor, exp_avg_sq: Tensor, dtype: torch.dtype, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The moments, computed in the math dtype, rounded to the state's ``dtype``: bf16 stochastically, others to
    nearest.

    Why bf16 moments cannot round to nearest: AdamNX's weight 1 − β̂2_t is about 1/t, and once (1 − β̂2_t)·v is
    below half a bf16 ulp of v (past t ≈ 256) a decrease of v rounds away while a large g² still pushes v up: v
    drifts upwards (+31% after 1,000 steps of unit Gaussian gradients). Stochastic rounding is unbiased, so v tracks
    float32 state. 32 random bits per element serve both moments (16 bits each): from ``noise``
    (:func:`moment_noise`, tiled) or, without it, drawn per element.
    """
    if dtype != torch.bfloat16:
        return exp_avg.to(dtype), exp_avg_sq.to(dtype)
    if noise is None:
        bits = torch.randint_like(exp_avg, -(1 << 31), 1 << 31, dtype=torch.int32)
        return (
            stochastic_round_to_bf16(exp_avg, bits & 0xFFFF),
            stochastic_round_to_bf16(exp_avg_sq, (bits >> 16) & 0xFFFF),
        )
    return _tiled_round(exp_avg, noise & 0xFFFF), _tiled_round(exp_avg_sq, (noise >> 16) & 0xFFFF)


def _tiled_round(x: Tensor, noise: Tensor) -> Tensor:
    """:func:`stochastic_round_to_bf16` of ``x`` with element ``i`` drawing ``noise[i mod NOISE_PERIOD]``: the whole
    periods broadcast against ``noise`` (the noise is never repeated in memory), the tail takes its first values."""
    flat = x.reshape(-1)
    whole = flat.numel() - flat.numel() % NOISE_PERIOD
    out = torch.empty(flat.shape, dtype=torch.bfloat16, device=x.device)
    out[:whole].view(-1, NOISE_PERIOD).copy_(stochastic_round_to_bf16(flat[:whole].view(-1, NOISE_PERIOD), noise))
    out[whole:].copy_(stochastic_round_to_bf16(flat[whole:], noise[: flat.numel() - whole]))
    return out.view(x.shape)


def _wider_real_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    dtype = torch.promote_types(torch.promote_types(a, b), torch.float32)
    return dtype.to_real() if dtype.is_complex else dtype


# Precomputed: the step asks for every tensor (a table, not functools.cache, which torch.compile warns about).
_KNOWN = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
_MATH_DTYPES = {(a, b): _wider_real_dtype(a, b) for a in _KNOWN for b in _KNOWN}


def math_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor's update is computed in: the wider of the param's and the state's, and at least float32
    (fp16 would round eps = 1e-8 to 0). Complex tensors are updated through their real views."""
    dtype = _MATH_DTYPES.get((param_dtype, state_dtype))
    return dtype if dtype is not None else _wider_real_dtype(param_dtype, state_dtype)
