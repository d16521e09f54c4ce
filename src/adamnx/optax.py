r"""AdamNX for JAX: an optax ``GradientTransformation`` twin of :class:`adamnx.AdamNX`.

Same algorithm, same coefficients (:func:`adamnx.schedule.coefficients`), same decoupled weight decay scaled
by the scheduled learning rate; tested against :mod:`adamnx.reference` and the torch optimizer.

=====================  ===================
paper                  optax state / arg
=====================  ===================
:math:`t`              ``count`` (int32, saturating)
:math:`m_t`            ``mu``
:math:`v_t`            ``nu``
:math:`\beta_1,\beta_2`  ``b1``, ``b2``
:math:`\lambda`        ``weight_decay``
=====================  ===================

Importing :mod:`adamnx` never imports JAX; this module needs ``pip install "adamnx[jax]"``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

try:
    import jax
    import jax.numpy as jnp
    import optax
    import optax.tree_utils as otu
except ImportError as exc:  # pragma: no cover - exercised only without JAX
    raise ImportError('adamnx.optax needs JAX and optax: pip install "adamnx[jax]"') from exc

from adamnx.schedule import coefficients

__all__ = ["ScaleByAdamNXState", "adamnx", "scale_by_adamnx"]


class ScaleByAdamNXState(NamedTuple):
    """State of :func:`scale_by_adamnx`."""

    count: jax.Array
    """t: the int32 step count, saturating at 2^31 − 1 (by then v is frozen anyway)."""
    mu: optax.Updates
    """m_t, the bias-corrected first moment."""
    nu: optax.Updates
    """v_t, the normalised second moment."""


def scale_by_adamnx(
    b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8, *, mu_dtype: Any | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Rescale updates by AdamNX's moments: :math:`u_t = m_t / (\sqrt{v_t} + \epsilon)`.

    .. math::
        m_t = \beta_{1,t} m_{t-1} + (1-\beta_{1,t}) g_t, \quad
        v_t = \hat\beta_{2,t} v_{t-1} + (1-\hat\beta_{2,t}) g_t^2,

    with :math:`\beta_{1,t} = (\beta_1-\beta_1^t)/(1-\beta_1^t)` and :math:`\hat\beta_{2,t} = (1-c^{t-1})/(1-c^t)`,
    :math:`c = \beta_2^{1-\beta_2}`. The weights :math:`1-\beta_{1,t}` and :math:`1-\hat\beta_{2,t}` are
    computed with expm1/exp (no 0/0 in float32, even for :math:`\beta_2 = 0.9999`).

    Args:
        b1: :math:`\beta_1`, ``0 ≤ b1 < 1``.
        b2: :math:`\beta_2`, ``0 < b2 < 1``; sets the horizon :math:`H = 1/(1-c)` (0.99 → ~9,950 steps).
        eps: added to :math:`\sqrt{v_t}`.
        mu_dtype: dtype of the first moment (``None``: the params').

    Returns:
        A :class:`optax.GradientTransformationExtraArgs`.

    Example:
        >>> import jax.numpy as jnp
        >>> from adamnx.optax import scale_by_adamnx
        >>> tx = scale_by_adamnx()
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> updates, state = tx.update({"w": jnp.array([0.5, -4.0])}, tx.init(params))
        >>> updates["w"]  # the first step is sign(g) (up to eps)
        Array([ 1., -1.], dtype=float32)

    References:
        Zhu, Xiao and Min, "AdamNX: An Adam improvement algorithm based on a novel exponential decay
        mechanism for the second-order moment estimate", arXiv:2511.13465.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    if isinstance(b1, (int, float)) and isinstance(b2, (int, float)):
        coefficients(1, (b1, b2))  # validates the betas eagerly, with torch's messages

    def init_fn(params: optax.Params) -> ScaleByAdamNXState:
        return ScaleByAdamNXState(
            count=jnp.zeros([], jnp.int32),
            mu=otu.tree_zeros_like(params, dtype=mu_dtype),
            nu=otu.tree_zeros_like(params),
        )

    def update_fn(updates: optax.Updates, state: ScaleByAdamNXState, params: optax.Params | None = None, **extra_args):
        del params, extra_args
        count = optax.safe_int32_increment(state.count)
        # Python-float betas keep their float64 logs; the step enters in the compute dtype.
        w1, w2 = coefficients(count.astype(jnp.result_type(float)), (b1, b2))

        def new_mu(m, g):
            return None if g is None else (m + w1.astype(m.dtype) * (g.astype(m.dtype) - m))

        def new_nu(v, g):
            return None if g is None else (v * (1 - w2).astype(v.dtype) + w2.astype(v.dtype) * jnp.square(g))

        mu = jax.tree.map(new_mu, state.mu, updates, is_leaf=lambda x: x is None)
        nu = jax.tree.map(new_nu, state.nu, updates, is_leaf=lambda x: x is None)
        scaled = jax.tree.map(
            lambda m, v, g: None if g is None else (m / (jnp.sqrt(v) + eps)).astype(g.dtype),
            mu,
            nu,
            updates,
            is_leaf=lambda x: x is None,
        )
        return scaled, ScaleByAdamNXState(count=count, mu=otu.tree_cast(mu, mu_dtype), nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamnx(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mask: Any | None = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamNX with decoupled weight decay, exactly as :class:`adamnx.AdamNX` (same defaults).

    .. math::
        \theta_t = \theta_{t-1} - \eta_t \left( \frac{m_t}{\sqrt{v_t}+\epsilon} + \lambda \theta_{t-1} \right)
        = \theta_{t-1}(1 - \eta_t\lambda) - \eta_t \frac{m_t}{\sqrt{v_t}+\epsilon}

    so the weight decay is scaled by the (scheduled) learning rate :math:`\eta_t`, as in PyTorch.

    Args:
        learning_rate: a float or an optax schedule.
        b1: :math:`\beta_1`, see :func:`scale_by_adamnx`.
        b2: :math:`\beta_2`, see :func:`scale_by_adamnx`.
        eps: see :func:`scale_by_adamnx`.
        weight_decay: :math:`\lambda` (decoupled).
        mask: a pytree of booleans (or a function of the params returning one) selecting the leaves that
            get weight decay, as in :func:`optax.adamw`.
        mu_dtype: dtype of the first moment.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from adamnx.optax import adamnx
        >>> tx = adamnx(learning_rate=0.1, weight_decay=0.0)
        >>> params = jnp.array([1.0, -3.0])
        >>> state = tx.init(params)
        >>> for _ in range(100):
        ...     grads = jax.grad(lambda p: jnp.sum(p**2))(params)
        ...     updates, state = tx.update(grads, state, params)
        ...     params = optax.apply_updates(params, updates)
        >>> bool(jnp.all(jnp.abs(params) < 0.1))
        True
    """
    return optax.chain(
        scale_by_adamnx(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
