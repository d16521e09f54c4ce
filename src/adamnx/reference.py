"""A float64 NumPy AdamNX in the paper's notation: slow on purpose, and the tests' ground truth.

Each line of :meth:`AdamNXReference.step` is a line of the paper's algorithm (see ``adamnx.AdamNX``). The
coefficients come from :func:`adamnx.schedule.coefficients` (itself checked against mpmath in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adamnx.schedule import coefficients, log_c

__all__ = ["AdamNXReference", "second_moment_weights"]


class AdamNXReference:
    """AdamNX over a list of float64 arrays ``theta``; ``step(grads)`` skips entries whose gradient is None.

    The step counter ``t`` is per parameter, as in the torch optimizer.
    """

    def __init__(
        self,
        theta: Sequence[np.ndarray],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        maximize: bool = False,
    ) -> None:
        self.theta = [np.array(x, dtype=np.float64) for x in theta]
        self.m = [np.zeros_like(x) for x in self.theta]
        self.v = [np.zeros_like(x) for x in self.theta]
        self.t = [0 for _ in self.theta]
        self.lr, self.betas, self.eps, self.weight_decay, self.maximize = lr, betas, eps, weight_decay, maximize

    def step(self, grads: Sequence[np.ndarray | None], lr: float | None = None) -> list[np.ndarray]:
        """One AdamNX step with ``grads`` (one per parameter, None to skip it) at ``lr`` (default: the constructor's).

        Returns the updated ``theta`` (a list of float64 arrays).
        """
        eta = self.lr if lr is None else lr
        lam, eps = self.weight_decay, self.eps
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = -np.asarray(grad, np.float64) if self.maximize else np.asarray(grad, np.float64)
            self.t[i] += 1
            one_minus_beta1_t, one_minus_beta2_hat = coefficients(self.t[i], self.betas)
            beta1_t, beta2_hat = 1.0 - one_minus_beta1_t, 1.0 - one_minus_beta2_hat
            theta = self.theta[i] * (1.0 - eta * lam)
            self.m[i] = beta1_t * self.m[i] + one_minus_beta1_t * g
            self.v[i] = beta2_hat * self.v[i] + one_minus_beta2_hat * g**2
            self.theta[i] = theta - eta * self.m[i] / (np.sqrt(self.v[i]) + eps)
        return self.theta


def second_moment_weights(t: int, beta2: float) -> np.ndarray:
    """The weights w_1..w_t with v_t = Σ_k w_k g_k²: w_k = c^(k−1)(1−c)/(1−c^t) (they sum to 1)."""
    lc = log_c(beta2)
    k = np.arange(1, t + 1, dtype=np.float64)
    return np.exp((k - 1) * lc) * np.expm1(lc) / np.expm1(t * lc)
