r"""AdamNX for JAX: an optax ``GradientTransformation`` twin of :class:`adamnx.AdamNX`.

Same algorithm, same coefficients (:func:`adamnx.schedule.coefficients`), same decoupled weight decay scaled
by the scheduled learning rate; tested against :mod:`adamnx.reference` and the torch optimizer.

========================  ==============================================================================
paper                     optax state / arg
========================  ==============================================================================
:math:`t`                 ``count`` (int32, saturating)
:math:`m_t`               ``mu``
:math:`v_t`               ``nu``
:math:`\beta_1,\beta_2`   ``b1``, ``b2``
:math:`\lambda`           ``weight_decay``
per-coordinate :math:`t`  ``coord_count`` (``per_coordinate_steps=True``; int32 per element, saturating)
========================  ==============================================================================

With ``per_coordinate_steps=True`` the state is a :class:`ScaleByAdamNXPerCoordinateState` (the three fields of
:class:`ScaleByAdamNXState`, then ``coord_count``), as ``AdamNX(..., per_coordinate_steps=True)``'s ``coord_step``.

Importing :mod:`adamnx` never imports JAX; this module needs JAX and optax (``pip install jax optax``, or ``pip install -e ".[jax]"`` in a clone of adamnx).
"""

from __future__ import annotations

from typing import Any, NamedTuple

try:
    import jax
    import jax.numpy as jnp
    import optax
    import optax.tree_utils as otu
except ImportError as exc:  # pragma: no cover - exercised only without JAX
    raise ImportError(
        'adamnx.optax needs JAX and optax: pip install jax optax (or, in a clone of adamnx, pip install -e ".[jax]")'
    ) from exc

from adamnx.schedule import coefficients

__all__ = ["ScaleByAdamNXPerCoordinateState", "ScaleByAdamNXState", "adamnx", "scale_by_adamnx"]


class ScaleByAdamNXState(NamedTuple):
    """State of :func:`scale_by_adamnx`."""

    count: jax.Array
    """t: the int32 step count, saturating at 2^31 − 1 (by then v is frozen anyway)."""
    mu: optax.Updates
    """m_t, the bias-corrected first moment."""
    nu: optax.Updates
    """v_t, the normalised second moment."""


class ScaleByAdamNXPerCoordinateState(NamedTuple):
    """State of :func:`scale_by_adamnx` with ``per_coordinate_steps=True``: :class:`ScaleByAdamNXState`'s fields,
    then the per-coordinate step counts."""

    count: jax.Array  # int32 steps taken by the transformation, saturating at 2^31 − 1
    mu: optax.Updates
    nu: optax.Updates
    coord_count: optax.Updates  # int32 per element: steps since its first non-zero gradient (0 before), saturating


def _is_none(x: Any) -> bool:
    return x is None


def _advance_coord_count(count: jax.Array | None, g: jax.Array | None) -> jax.Array | None:
    """A coordinate starts counting at its first non-zero gradient, as torch's ``coord_step``."""
    if g is None:
        return None
    started = (count > 0) | (g != 0)
    return jnp.where(started, optax.safe_int32_increment(count), jnp.zeros_like(count))


def _math_dtype(*dtypes: Any) -> Any:
    """The dtype a leaf's moments are updated in: the widest of their dtypes and at least float32 (as torch's)."""
    return jnp.result_type(jnp.float32, *dtypes)


def _new_moments(m, v, g, w):
    """m_t and v_t of one leaf, in the math dtype (rounded to the state's dtypes only when stored)."""
    dtype = _math_dtype(m.dtype, v.dtype, g.dtype)
    m, v, g = m.astype(dtype), v.astype(dtype), g.astype(dtype)
    w1, w2 = w.one_minus_beta1_t.astype(dtype), w.one_minus_beta2_hat.astype(dtype)
    return m + w1 * (g - m), v * (1 - w2) + w2 * jnp.square(g)


def _round_bf16(x: jax.Array, noise: jax.Array) -> jax.Array:
    """``x`` to bfloat16, stochastically (unbiased): ``noise``, uniform in [0, 2^16), is added below bf16's last
    mantissa bit, then truncated (torch's ``adamnx.update.stochastic_round_to_bf16``)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jnp.where((bits & 0x7F800000) == 0x7F800000, jnp.uint32(0), noise)  # inf and NaN keep their bits
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return rounded.astype(jnp.bfloat16)  # low 16 bits 0: exact


def _stored(m, v, mu_dtype, nu_dtype, key):
    """m and v in the state's dtypes: bf16 rounded stochastically (AdamNX's 1 − β̂2_t ≈ 1/t makes round-to-nearest
    bias v upwards, as in torch), other dtypes to nearest."""
    if jnp.bfloat16 not in (mu_dtype, nu_dtype):
        return m.astype(mu_dtype), v.astype(nu_dtype)
    bits = jax.random.bits(key, m.shape, jnp.uint32)  # 16 bits for each moment
    m = _round_bf16(m, bits & 0xFFFF) if mu_dtype == jnp.bfloat16 else m.astype(mu_dtype)
    v = _round_bf16(v, bits >> 16) if nu_dtype == jnp.bfloat16 else v.astype(nu_dtype)
    return m, v


def scale_by_adamnx(
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
    per_coordinate_steps: bool = False,
    seed: int = 0,
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
        nu_dtype: dtype of the second moment (``None``: the params'). The moments are updated in at least float32
            and rounded once when stored; bf16 moments round stochastically (unbiased), as in torch: AdamNX's
            weight 1 − β̂2_t ≈ 1/t makes a decrease of v smaller than half a bf16 ulp past t ≈ 256, and
            round-to-nearest would bias v upwards (+31% after 1,000 steps of unit Gaussian gradients).
        per_coordinate_steps: count steps per element, from its first non-zero gradient (``coord_count``, int32
            shaped like each param), so that a coordinate whose gradient is zero until a late step follows the
            schedule from its own t = 1 (m = g, v = g², then v the mean of its g²), as
            ``AdamNX(..., per_coordinate_steps=True)``. Before its first non-zero gradient a coordinate keeps
            m = v = 0 and gets a zero update. The coefficients are evaluated per element in the default float
            dtype (float32 unless ``jax_enable_x64``), as for the shared ``count``: a float32 count is exact below
            2^24 steps; beyond, t is rounded by a relative 2^-24 at most, which moves a coefficient by about one
            float32 ulp.
            Off by default: the paper's algorithm.
        seed: the random stream of the stochastic rounding of bf16 moments (a key folded with the step count and
            the leaf's index: no key in the state, and the same updates for the same inputs).

    Returns:
        A :class:`optax.GradientTransformationExtraArgs`. Its state is a :class:`ScaleByAdamNXState`, or with
        ``per_coordinate_steps`` a :class:`ScaleByAdamNXPerCoordinateState`.

    Example:
        >>> import jax.numpy as jnp
        >>> from adamnx.optax import scale_by_adamnx
        >>> tx = scale_by_adamnx()
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> updates, state = tx.update({"w": jnp.array([0.5, -4.0])}, tx.init(params))
        >>> updates["w"]  # the first step is sign(g) (up to eps)
        Array([ 1., -1.], dtype=float32)

        With ``per_coordinate_steps``, a coordinate's first non-zero gradient is its own step 1:

        >>> tx = scale_by_adamnx(per_coordinate_steps=True)
        >>> state = tx.init(params)
        >>> for g in ([0.5, 0.0], [0.5, 0.0], [0.5, -4.0]):
        ...     updates, state = tx.update({"w": jnp.array(g)}, state)
        >>> state.coord_count["w"]
        Array([3, 1], dtype=int32)
        >>> updates["w"]  # for w[1], sign(g) as at step 1
        Array([ 1., -1.], dtype=float32)

    References:
        Zhu, Xiao and Min, "AdamNX: An Adam improvement algorithm based on a novel exponential decay
        mechanism for the second-order moment estimate", arXiv:2511.13465.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)
    if isinstance(b1, (int, float)) and isinstance(b2, (int, float)):
        coefficients(1, (b1, b2))  # validates the betas eagerly, with torch's messages

    def init_fn(params: optax.Params) -> ScaleByAdamNXState | ScaleByAdamNXPerCoordinateState:
        count = jnp.zeros([], jnp.int32)
        mu, nu = otu.tree_zeros_like(params, dtype=mu_dtype), otu.tree_zeros_like(params, dtype=nu_dtype)
        if per_coordinate_steps:
            return ScaleByAdamNXPerCoordinateState(count, mu, nu, otu.tree_zeros_like(params, dtype=jnp.int32))
        return ScaleByAdamNXState(count=count, mu=mu, nu=nu)

    def update_fn(updates: optax.Updates, state, params: optax.Params | None = None, **extra_args):
        del params, extra_args
        count = optax.safe_int32_increment(state.count)
        # Python-float betas keep their float64 logs; the step enters in the compute dtype.
        step_dtype = jnp.result_type(float)
        if per_coordinate_steps:
            coord_count = jax.tree.map(_advance_coord_count, state.coord_count, updates, is_leaf=_is_none)
            weights = jax.tree.map(  # a Coefficients of arrays shaped like the leaf, t = max(count, 1)
                lambda c: None if c is None else coefficients(jnp.maximum(c, 1).astype(step_dtype), (b1, b2)),
                coord_count,
                is_leaf=_is_none,
            )
        else:
            shared = coefficients(count.astype(step_dtype), (b1, b2))
            weights = jax.tree.map(lambda _: shared, state.nu, is_leaf=_is_none)
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_none)
        step_key = jax.random.fold_in(jax.random.key(seed), count)
        keys = treedef.unflatten([jax.random.fold_in(step_key, i) for i in range(len(leaves))])

        def leaf(m, v, g, w, key):
            if g is None:
                return None
            new_m, new_v = _new_moments(m, v, g, w)
            return (new_m / (jnp.sqrt(new_v) + eps)).astype(g.dtype), _stored(new_m, new_v, m.dtype, v.dtype, key)

        out = jax.tree.map(leaf, state.mu, state.nu, updates, weights, keys, is_leaf=_is_none)
        is_pair = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
        scaled = jax.tree.map(lambda o: None if o is None else o[0], out, is_leaf=is_pair)
        mu = jax.tree.map(lambda o: None if o is None else o[1][0], out, is_leaf=is_pair)
        nu = jax.tree.map(lambda o: None if o is None else o[1][1], out, is_leaf=is_pair)
        if per_coordinate_steps:
            return scaled, ScaleByAdamNXPerCoordinateState(count, mu, nu, coord_count)
        return scaled, ScaleByAdamNXState(count=count, mu=mu, nu=nu)

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
    nu_dtype: Any | None = None,
    per_coordinate_steps: bool = False,
    seed: int = 0,
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
        nu_dtype: dtype of the second moment (bf16 moments round stochastically: see :func:`scale_by_adamnx`).
        per_coordinate_steps: per-element step counts from each coordinate's first non-zero gradient; see
            :func:`scale_by_adamnx`. The weight decay still applies to every coordinate from step 1.
        seed: the stochastic rounding's random stream (see :func:`scale_by_adamnx`).

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
    moments = scale_by_adamnx(
        b1=b1,
        b2=b2,
        eps=eps,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        per_coordinate_steps=per_coordinate_steps,
        seed=seed,
    )
    return optax.chain(
        moments,
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
