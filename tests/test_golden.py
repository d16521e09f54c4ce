"""Golden trajectories: the paper's formulas in 40-digit mpmath (tests/golden/make_golden.py), independent of the
package's coefficient function, against the reference and every torch implementation and the optax twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adamnx.reference import AdamNXReference
from helpers import IMPLEMENTATIONS

GOLDEN = sorted(Path(__file__).with_name("golden").glob("*.json"))


def _load(path):
    data = json.loads(path.read_text())
    hp = data["hyperparameters"]
    kwargs = {"lr": hp["lr"], "betas": tuple(hp["betas"]), "eps": hp["eps"], "weight_decay": hp["weight_decay"]}
    return data, kwargs


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_reference_follows_the_golden_trajectory(path):
    data, kwargs = _load(path)
    ref = AdamNXReference([np.array(data["theta0"])], **kwargs)
    for g, expected in zip(data["grads"], data["states"]):
        ref.step([np.array(g)])
        np.testing.assert_allclose(ref.theta[0], expected["theta"], rtol=1e-13)
        np.testing.assert_allclose(ref.m[0], expected["m"], rtol=1e-13)
        np.testing.assert_allclose(ref.v[0], expected["v"], rtol=1e-13)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_torch_follows_the_golden_trajectory(path, impl):
    data, kwargs = _load(path)
    p = torch.tensor(data["theta0"], dtype=torch.float64, requires_grad=True)
    opt = IMPLEMENTATIONS[impl]([p], **kwargs)
    for g in data["grads"]:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    final = data["states"][-1]
    np.testing.assert_allclose(p.detach().numpy(), final["theta"], rtol=1e-12)
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), final["v"], rtol=1e-12)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_optax_follows_the_golden_trajectory(path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    from adamnx.optax import adamnx

    data, kwargs = _load(path)
    with jax.enable_x64(True):
        tx = adamnx(
            kwargs["lr"],
            b1=kwargs["betas"][0],
            b2=kwargs["betas"][1],
            eps=kwargs["eps"],
            weight_decay=kwargs["weight_decay"],
        )
        params = jnp.array(data["theta0"], dtype=jnp.float64)
        state = tx.init(params)
        for g in data["grads"]:
            updates, state = tx.update(jnp.array(g, dtype=jnp.float64), state, params)
            params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params), data["states"][-1]["theta"], rtol=1e-10)
