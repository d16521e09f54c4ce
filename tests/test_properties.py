"""Hypothesis: random shapes, dtypes, hyperparameters and implementations, always against the reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import IMPLEMENTATIONS, assert_matches_reference, run_reference, run_torch

# Per-dtype tolerance on the norm-wise relative error, per step taken. bf16 stores 8 significant bits, so each
# step may add about 2^-8 relative error to p, m and v (worst seen: 5.4e-3 a step over random cases, 8e-3 for a
# scalar param crossing zero with lr 0.1); 2^-6 leaves a margin and still catches any real error.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2**-6}

shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape_list=shapes,
    dtype=st.sampled_from(list(TOLERANCE)),
    impl=st.sampled_from(list(IMPLEMENTATIONS)),
    n_steps=st.integers(1, 8),
    lr=st.sampled_from([1e-3, 1e-1]),
    beta1=st.sampled_from([0.0, 0.5, 0.9]),
    beta2=st.sampled_from([0.5, 0.9, 0.99, 0.9999]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_dtype_matches_reference(
    shape_list, dtype, impl, n_steps, lr, beta1, beta2, weight_decay, maximize, seed
):
    g = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shape_list]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shape_list] for _ in range(n_steps)]
    kwargs = {"lr": lr, "betas": (beta1, beta2), "weight_decay": weight_decay, "maximize": maximize}
    params, opt = run_torch(params0, grads, **kwargs, **IMPLEMENTATIONS[impl])
    ref = run_reference(params0, grads, **kwargs)
    tol = TOLERANCE[dtype] * (n_steps if dtype == torch.bfloat16 else 1)
    assert_matches_reference(params, opt, ref, tol=tol)
