"""Regenerate the golden AdamNX trajectories: the paper's update in 40-digit mpmath, independent of adamnx.

    python tests/golden/make_golden.py

Each file holds the hyperparameters, the gradient sequence (exact binary floats written as decimals with 17
significant digits), and θ_t, m_t, v_t after every step, computed straight from the paper's formulas (the README's *The algorithm*).
"""

import json
import random
from pathlib import Path

import mpmath

CASES = {
    "default": {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01, "steps": 200},
    "short_horizon": {"lr": 3e-2, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0.1, "steps": 300},
}


def trajectory(lr, betas, eps, weight_decay, steps, seed=0, dim=3):
    mpmath.mp.dps = 40
    rnd = random.Random(seed)
    grads = [[rnd.gauss(0.0, 1.0) * 10 ** rnd.uniform(-2, 1) for _ in range(dim)] for _ in range(steps)]
    b1, b2 = mpmath.mpf(betas[0]), mpmath.mpf(betas[1])
    eta, lam, eps_ = mpmath.mpf(lr), mpmath.mpf(weight_decay), mpmath.mpf(eps)
    c = b2 ** (1 - b2)
    theta = [mpmath.mpf(x) for x in (0.5, -1.0, 2.0)][:dim]
    m = [mpmath.mpf(0)] * dim
    v = [mpmath.mpf(0)] * dim
    out = []
    for t, g in enumerate(grads, start=1):
        beta1_t = (b1 - b1**t) / (1 - b1**t)
        beta2_hat = (1 - c ** (t - 1)) / (1 - c**t)
        g = [mpmath.mpf(x) for x in g]
        m = [beta1_t * mi + (1 - beta1_t) * gi for mi, gi in zip(m, g)]
        v = [beta2_hat * vi + (1 - beta2_hat) * gi**2 for vi, gi in zip(v, g)]
        theta = [th * (1 - eta * lam) - eta * mi / (mpmath.sqrt(vi) + eps_) for th, mi, vi in zip(theta, m, v)]
        out.append({"theta": [float(x) for x in theta], "m": [float(x) for x in m], "v": [float(x) for x in v]})
    return grads, out


if __name__ == "__main__":
    for name, hp in CASES.items():
        grads, states = trajectory(**hp)
        data = {"hyperparameters": hp, "theta0": [0.5, -1.0, 2.0], "grads": grads, "states": states}
        path = Path(__file__).with_name(f"{name}.json")
        path.write_text(json.dumps(data, indent=0))
        print("wrote", path)
