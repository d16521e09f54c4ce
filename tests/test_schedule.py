"""The coefficients against mpmath, the paper's sample values, and the closed form of v_t."""

import math

import mpmath
import numpy as np
import pytest
import torch

from adamnx import beta2_for_horizon, coefficients, horizon
from adamnx.reference import AdamNXReference, second_moment_weights

STEPS = [1, 2, 10, 10**4, 10**6, 10**9]
BETA2S = [0.9, 0.99, 0.999, 0.9999]


def exact(step: int, beta1: float, beta2: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """(1 − β1_t, 1 − β̂2_t) in 60-digit arithmetic from the paper's definitions, betas taken as exact binary floats."""
    with mpmath.workdps(60):
        b1, b2, t = mpmath.mpf(beta1), mpmath.mpf(beta2), mpmath.mpf(step)
        beta1_t = (b1 - b1**t) / (1 - b1**t)
        c = b2 ** (1 - b2)
        beta2_hat = (1 - c ** (t - 1)) / (1 - c**t)
        return 1 - beta1_t, 1 - beta2_hat


def close(actual: float, expected: mpmath.mpf, rtol: float) -> bool:
    expected = float(expected)
    if expected < 1e-300:  # below float64's normal range: must round to (almost) 0, never NaN
        return 0.0 <= actual <= 1e-300
    return abs(actual - expected) <= rtol * expected


@pytest.mark.parametrize("beta2", BETA2S)
@pytest.mark.parametrize("step", STEPS)
def test_coefficients_match_mpmath(step, beta2):
    w1, w2 = coefficients(step, (0.9, beta2))
    e1, e2 = exact(step, 0.9, beta2)
    assert close(w1, e1, 1e-14), (w1, e1)
    assert close(w2, e2, 1e-12), (w2, e2)


@pytest.mark.parametrize("beta2", BETA2S)
def test_torch_and_numpy_evaluations_agree_with_math(beta2):
    steps = np.array(STEPS, dtype=np.float64)
    np_w1, np_w2 = coefficients(steps, (0.9, beta2))
    t_w1, t_w2 = coefficients(torch.tensor(STEPS, dtype=torch.float64), (0.9, beta2))
    for i, s in enumerate(STEPS):
        w1, w2 = coefficients(s, (0.9, beta2))
        for a, b in ((np_w1[i], w1), (np_w2[i], w2), (t_w1[i].item(), w1), (t_w2[i].item(), w2)):
            assert a == pytest.approx(b, rel=1e-13, abs=1e-300)


@pytest.mark.parametrize("beta2", [*BETA2S, 0.99999, 0.5, 0.01])
def test_float32_tensor_coefficients_have_no_nan(beta2):
    """The naive 1 − β̂2_t is 0/0 in float32 for β2 ≥ 0.9999; the stable form stays finite and accurate."""
    steps = torch.tensor([1, 2, 3, 10, 1e4, 1e6, 1e9], dtype=torch.float32)
    w1, w2 = coefficients(steps, (0.9, beta2))
    assert torch.isfinite(w1).all() and torch.isfinite(w2).all()
    assert w2[0].item() == 1.0 and w1[0].item() == 1.0
    for i, s in enumerate(steps.tolist()):
        expected = float(exact(int(s), 0.9, beta2)[1])
        if expected > 1e-30:
            assert w2[i].item() == pytest.approx(expected, rel=1e-4)


def test_integer_step_tensors_are_evaluated_in_float64():
    w = coefficients(torch.tensor([3, 10**8]), (0.9, 0.999)).one_minus_beta2_hat
    assert w.dtype == torch.float64
    assert w[1].item() == pytest.approx(float(exact(10**8, 0.9, 0.999)[1]), rel=1e-12)


def test_paper_sample_values_beta2_099():
    expected = {10: 9.996e-2, 100: 9.950e-3, 1_000: 9.506e-4, 10_000: 5.80e-5, 100_000: 4.34e-9}
    for t, value in expected.items():
        assert coefficients(t, (0.9, 0.99)).one_minus_beta2_hat == pytest.approx(value, rel=2e-3)
    assert coefficients(10**6, (0.9, 0.99)).one_minus_beta2_hat < 1e-40


def test_first_step_coefficients_are_exactly_one_and_beta1_zero_is_plain_gradient():
    assert tuple(coefficients(1, (0.9, 0.99))) == (1.0, 1.0)
    assert coefficients(7, (0.0, 0.99)).one_minus_beta1_t == 1.0
    assert coefficients(torch.tensor(7.0, dtype=torch.float64), (0.0, 0.99)).one_minus_beta1_t.item() == 1.0


def test_beta1_t_is_adam_bias_correction():
    """m_t with β1_t equals Adam's bias-corrected m̂_t."""
    rng = np.random.default_rng(0)
    g = rng.normal(size=50)
    m_nx, m_adam = 0.0, 0.0
    for t in range(1, 51):
        w1 = coefficients(t, (0.9, 0.99)).one_minus_beta1_t
        m_nx = (1 - w1) * m_nx + w1 * g[t - 1]
        m_adam = 0.9 * m_adam + 0.1 * g[t - 1]
        assert m_nx == pytest.approx(m_adam / (1 - 0.9**t), rel=1e-12)


@pytest.mark.parametrize(
    ("beta2", "expected"), [(0.9, 95), (0.95, 390), (0.98, 2_475), (0.99, 9_950), (0.995, 39_900), (0.999, 1e6)]
)
def test_horizon_table(beta2, expected):
    assert horizon(beta2) == pytest.approx(expected, rel=1e-2)
    c = beta2 ** (1 - beta2)
    assert horizon(beta2) == pytest.approx(1 / (1 - c), rel=1e-9)


@pytest.mark.parametrize("h", [1.5, 10.0, 95.0, 9_950.0, 1e6, 1e12])
def test_beta2_for_horizon_inverts_horizon(h):
    assert horizon(beta2_for_horizon(h)) == pytest.approx(h, rel=1e-9)


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0, math.inf, math.nan])
def test_beta2_for_horizon_rejects_impossible_horizons(bad):
    with pytest.raises(ValueError, match="horizon_steps"):
        beta2_for_horizon(bad)


@pytest.mark.parametrize("betas", [(0.9, 0.0), (0.9, 1.0), (1.0, 0.99), (-0.1, 0.99)])
def test_coefficients_reject_invalid_betas(betas):
    with pytest.raises(ValueError, match="Invalid beta"):
        coefficients(3, betas)


@pytest.mark.parametrize("beta2", [0.9, 0.99])
def test_v_is_the_weighted_mean_of_all_squared_gradients(beta2):
    """v_t = Σ_k w_k g_k², w_k = c^(k−1)(1−c)/(1−c^t): the weights sum to 1 and the oldest weigh most."""
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(300, 4))
    ref = AdamNXReference([np.zeros(4)], betas=(0.9, beta2), weight_decay=0.0)
    for t, g in enumerate(grads, start=1):
        ref.step([g])
        w = second_moment_weights(t, beta2)
        assert w.sum() == pytest.approx(1.0, rel=1e-12)
        assert np.all(np.diff(w) <= 0)
        np.testing.assert_allclose(ref.v[0], w @ grads[:t] ** 2, rtol=1e-12)


def test_first_step_is_gradient_and_sign():
    g = np.array([3.0, -0.5, 1e-3])
    ref = AdamNXReference([np.ones(3)], lr=0.1, weight_decay=0.0, eps=0.0)
    ref.step([g])
    assert np.array_equal(ref.m[0], g) and np.array_equal(ref.v[0], g**2)
    np.testing.assert_allclose(ref.theta[0], 1 - 0.1 * np.sign(g), rtol=1e-15)
