r"""The coefficients of AdamNX, computed once and stably.

This module is the single place where the step coefficients are derived. Every implementation
(NumPy reference, for-loop, foreach, fused, optax) calls :func:`coefficients`.

Paper notation → code names:

=====================================  =============================
paper                                  code
=====================================  =============================
:math:`t`                              ``step`` (1, 2, ...)
:math:`\beta_{1,t} = (\beta_1-\beta_1^t)/(1-\beta_1^t)`    ``beta1_t``
:math:`1-\beta_{1,t} = (1-\beta_1)/(1-\beta_1^t)`           ``one_minus_beta1_t``
:math:`c = \beta_2^{\,1-\beta_2}`                           ``c``; ``log_c`` is :math:`\log c`
:math:`\hat\beta_{2,t} = (1-c^{t-1})/(1-c^t)`               ``beta2_hat``
:math:`1-\hat\beta_{2,t} = c^{t-1}(1-c)/(1-c^t)`            ``one_minus_beta2_hat``
:math:`H = 1/(1-c)`                                         :func:`horizon`
=====================================  =============================

Why the "one minus" forms: :math:`\hat\beta_{2,t}` tends to 1, so ``1 - beta2_hat`` after rounding loses
every digit (float32 gives 0/0 = NaN for :math:`\beta_2 \ge 0.9999` at t = 1, 2). We evaluate

.. math::
    1-\hat\beta_{2,t} = \frac{e^{(t-1)\log c}\,\operatorname{expm1}(\log c)}{\operatorname{expm1}(t\log c)},
    \qquad \log c = (1-\beta_2)\operatorname{log1p}(-(1-\beta_2)),

which keeps full relative accuracy for every t and underflows gracefully to 0 (never NaN).

The functions accept Python numbers (computed with :mod:`math` in float64), NumPy arrays (float64), or
torch tensors (computed with torch ops on the tensor's device, in its dtype — pass a float64 step tensor for
full accuracy; no host synchronisation, so it is safe under CUDA graph capture and ``torch.compile``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = [
    "Coefficients",
    "beta2_for_horizon",
    "coefficients",
    "first_moment_weight",
    "horizon",
    "log_c",
    "second_moment_weight",
]


class Coefficients(NamedTuple):
    """The two per-step weights of AdamNX: ``m ← lerp(m, g, one_minus_beta1_t)``, ``v ← lerp(v, g², one_minus_beta2_hat)``."""

    one_minus_beta1_t: Any
    one_minus_beta2_hat: Any

    @property
    def beta1_t(self) -> Any:
        """β1_t = 1 − ``one_minus_beta1_t`` (rounded: use the "one minus" form in arithmetic)."""
        return 1 - self.one_minus_beta1_t

    @property
    def beta2_hat(self) -> Any:
        """β̂2_t = 1 − ``one_minus_beta2_hat`` (rounded: use the "one minus" form in arithmetic)."""
        return 1 - self.one_minus_beta2_hat


def _ops(*values: Any):
    """The library that evaluates exp/expm1/log1p for these values: torch, jax.numpy, numpy, or math."""
    modules = [type(v).__module__ for v in values if not isinstance(v, (int, float))]
    if any(m.startswith("torch") for m in modules):
        import torch

        return torch
    if any(m.startswith(("jax", "jaxlib")) for m in modules):
        import jax.numpy as jnp

        return jnp
    if modules:
        import numpy

        return numpy
    return math


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def check_betas(beta1: float, beta2: float) -> None:
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 < beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2} (AdamNX needs 0 < beta2 < 1)")


def log_c(beta2: Any) -> Any:
    r""":math:`\log c = (1-\beta_2)\log\beta_2`, accurate for β2 close to 1."""
    one_minus_beta2 = 1.0 - beta2  # exact for beta2 >= 0.5 (Sterbenz)
    return one_minus_beta2 * _ops(beta2).log1p(-one_minus_beta2)


def coefficients(step: Any, betas: tuple[Any, Any]) -> Coefficients:
    """The coefficients ``(1 − β1_t, 1 − β̂2_t)`` of step ``step`` (t ≥ 1), stably.

    Args:
        step: the step count t after incrementing (1 for the first update). A Python number, a NumPy array,
            a torch tensor or a JAX array; the result has the same kind.
        betas: ``(β1, β2)``, ``0 ≤ β1 < 1`` and ``0 < β2 < 1``: Python floats (validated, and their logs taken in
            float64), or arrays of the step's kind (as optax's ``inject_hyperparams`` passes them).

    Returns:
        :class:`Coefficients` with ``one_minus_beta1_t = (1−β1)/(1−β1^t)`` and
        ``one_minus_beta2_hat = c^(t−1)(1−c)/(1−c^t)``, ``c = β2^(1−β2)``. At t = 1 both are exactly 1.

    Example:
        >>> from adamnx import coefficients
        >>> coefficients(1, (0.9, 0.99))
        Coefficients(one_minus_beta1_t=1.0, one_minus_beta2_hat=1.0)
        >>> round(coefficients(100, (0.9, 0.99)).one_minus_beta2_hat, 7)
        0.0099503
    """
    return Coefficients(first_moment_weight(step, betas[0]), second_moment_weight(step, betas[1]))


def _as_float_step(step: Any) -> Any:
    if type(step).__module__.startswith("torch") and not step.is_floating_point():
        import torch

        step = step.to(torch.float64)  # an integer counter would otherwise be promoted to float32
    return step


def first_moment_weight(step: Any, beta1: Any) -> Any:
    """``1 − β1_t = (1 − β1)/(1 − β1^t)``: m_t is then exactly Adam's bias-corrected m̂_t."""
    step = _as_float_step(step)
    if _is_number(beta1):
        check_betas(beta1, 0.5)
        if beta1 == 0.0:  # m_t = g_t (and log(0) would warn)
            return step * 0 + 1.0
        log_beta1 = math.log(beta1)
    else:
        log_beta1 = _ops(beta1).log(beta1)  # β1 = 0: −inf, and the formula below still gives 1
    # Both expm1's in the step's precision (1 − β1 = −expm1(log β1)), so that t = 1 gives exactly x/x = 1
    # also in float32; a float64 numerator over a float32 denominator would give 1.0000001.
    log_beta1 = log_beta1 + step * 0
    ops = _ops(step, beta1)
    return ops.expm1(log_beta1) / ops.expm1(step * log_beta1)


def second_moment_weight(step: Any, beta2: Any) -> Any:
    """``1 − β̂2_t = c^(t−1)(1−c)/(1−c^t)``, ``c = β2^(1−β2)``, evaluated with exp/expm1 of (t−1)·log c and t·log c."""
    step = _as_float_step(step)
    if _is_number(beta2):
        check_betas(0.0, beta2)
    lc = log_c(beta2) + step * 0  # in the step's precision: at t = 1 the ratio is exactly x/x = 1 (see above)
    ops = _ops(step, beta2)
    return ops.exp((step - 1) * lc) * ops.expm1(lc) / ops.expm1(step * lc)


def horizon(beta2: float) -> float:
    """The memory horizon :math:`H = 1/(1-c)`: for t ≪ H, v is the plain mean of g²; for t ≫ H it freezes.

    >>> round(horizon(0.99))
    9950
    """
    check_betas(0.0, beta2)
    return -1.0 / math.expm1(log_c(beta2))


def beta2_for_horizon(horizon_steps: float) -> float:
    """The β2 whose horizon :func:`horizon` is ``horizon_steps`` (> 1); the inverse of :func:`horizon`.

    >>> round(beta2_for_horizon(9950.0), 6)
    0.99
    """
    if not horizon_steps > 1.0 or math.isinf(horizon_steps):
        raise ValueError(f"horizon_steps must be a finite number > 1, got {horizon_steps}")
    target = math.log1p(-1.0 / horizon_steps)  # the log c we need, < 0
    # log c = d·log1p(−d) with d = 1 − β2 increases monotonically as d shrinks: bisect on d in (0, 1).
    lo, hi = 0.0, 1.0  # log_c(1 - lo) = 0 > target, log_c(1 - hi) = -inf < target
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid * math.log1p(-mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-17 * hi:
            break
    return 1.0 - 0.5 * (lo + hi)
