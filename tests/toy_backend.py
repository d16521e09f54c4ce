"""A throwaway executor, registered from the test suite alone: what adding a backend takes (this module, one row).

``python -m pytest -p toy_backend -k toy`` registers it as a fused kernel for the CPU and runs every test
parametrized over the implementations on it (tests/test_structure.py does, in a subprocess). It is a plain loop of
:func:`adamnx.update.update_copies`, with the coefficients in whichever form the plan gives them.
"""

from __future__ import annotations

import torch

from adamnx import backends
from adamnx.backends import Backend
from adamnx.plan import StepPlan
from adamnx.update import update_copies


def execute(plan: StepPlan) -> None:
    hp = plan.hp
    lr = hp.lr.item() if isinstance(hp.lr, torch.Tensor) else hp.lr
    for bucket in plan.buckets:
        for i, grad in enumerate(bucket.grads):
            weights = bucket.scalar_coefficients(i) if bucket.guard is None else bucket.element_coefficients(i)
            update_copies(
                bucket.params[i], -grad if hp.maximize else grad, bucket.exp_avgs[i], bucket.exp_avg_sqs[i],
                weights, lr, hp.weight_decay, hp.eps, dtype=bucket.math_dtype, stochastic=bucket.stochastic,
            )  # fmt: skip


ROW = Backend("toy", execute, {"fused": True, "foreach": False}, devices=("cpu",), traced=False)


def pytest_configure(config) -> None:
    """Registered when pytest loads this module as a plugin (``-p toy_backend``), before any test module imports the
    table; importing it (as pytest's doctest collection does) registers nothing."""
    backends.register(ROW, before="fused")
