"""Every implementation against the float64 reference, and against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adamnx import AdamNX
from helpers import (
    HYPERPARAMETERS,
    IMPLEMENTATIONS,
    SHAPES,
    assert_matches_reference,
    gradient_sequence,
    initial_params,
    rel_err,
    run_reference,
    run_torch,
)

N_STEPS = 1_000


@pytest.fixture(scope="module")
def grads64():
    return gradient_sequence(N_STEPS)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("hp", HYPERPARAMETERS, ids=lambda hp: hp.desc)
def test_float64_matches_reference(impl, hp, grads64):
    params0 = initial_params()
    params, opt = run_torch(params0, grads64, **hp.kwargs, impl=impl)
    ref = run_reference(params0, grads64, **hp.kwargs)
    assert_matches_reference(params, opt, ref, tol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("hp", HYPERPARAMETERS[::3], ids=lambda hp: hp.desc)
def test_float32_matches_reference(impl, hp):
    grads = gradient_sequence(N_STEPS, dtype=torch.float32)
    params0 = initial_params(dtype=torch.float32)
    params, opt = run_torch(params0, grads, **hp.kwargs, impl=impl)
    ref = run_reference(params0, grads, **hp.kwargs)
    assert_matches_reference(params, opt, ref, tol=1e-5)


@pytest.mark.parametrize("kernel", list(IMPLEMENTATIONS))
def test_every_implementation_matches_the_for_loop_to_1e6_in_float32(kernel):
    grads = gradient_sequence(N_STEPS, dtype=torch.float32, seed=3)
    params0 = initial_params(dtype=torch.float32)
    loop, _ = run_torch(params0, grads, impl="for-loop", lr=3e-3)
    fused, _ = run_torch(params0, grads, impl=kernel, lr=3e-3)
    for a, b in zip(fused, loop):
        assert rel_err(a, b.detach().double().numpy()) <= 1e-6


def test_foreach_equals_for_loop_bitwise_with_awkward_params():
    """Params and state agree exactly; with a zero-size param, a param without grad on one step, a frozen one."""
    shapes = [(4, 3), (0,), (5,), (2, 2)]
    grads = gradient_sequence(50, shapes=shapes, seed=5)
    for t, step_grads in enumerate(grads):
        if t == 7:
            step_grads[2] = None  # no gradient on one step
        step_grads[3] = None  # a frozen layer: never a gradient
    params0 = initial_params(shapes)
    loop_params, loop_opt = run_torch(params0, grads, foreach=False)
    each_params, each_opt = run_torch(params0, grads, foreach=True)
    for p, q in zip(loop_params, each_params):
        assert torch.equal(p, q)
        s, r = loop_opt.state[p], each_opt.state[q]
        assert s.keys() == r.keys()
        for key in s:
            assert torch.equal(s[key], r[key]), key
    assert len(loop_opt.state[loop_params[3]]) == 0  # the frozen param never got state
    assert loop_opt.state[loop_params[2]]["step"].item() == 49  # one skipped step, per-param counter
    ref = run_reference(params0, grads)
    assert_matches_reference(loop_params[:3], loop_opt, ref, tol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_complex_params_equal_their_real_view_bitwise(impl):
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    complex_p = torch.view_as_complex(z0.clone()).requires_grad_(True)
    real_p = z0.clone().requires_grad_(True)
    c_opt = IMPLEMENTATIONS[impl]([complex_p], lr=1e-2)
    r_opt = IMPLEMENTATIONS[impl]([real_p], lr=1e-2)
    for _ in range(20):
        grad = torch.randn(6, 2, generator=g, dtype=torch.float64)
        complex_p.grad = torch.view_as_complex(grad.clone())
        real_p.grad = grad.clone()
        c_opt.step()
        r_opt.step()
    assert torch.equal(torch.view_as_real(complex_p.detach()), real_p.detach())
    assert torch.equal(torch.view_as_real(c_opt.state[complex_p]["exp_avg_sq"]), r_opt.state[real_p]["exp_avg_sq"])


@pytest.mark.parametrize(
    "impl", ["for-loop", "capturable", "foreach-capturable", "fused", "fused-inductor"], ids=lambda s: f"tensor-lr-{s}"
)
def test_tensor_lr_matches_float_lr(impl):
    grads = gradient_sequence(200, dtype=torch.float32, seed=2)
    params0 = initial_params(dtype=torch.float32)
    with_float, _ = run_torch(params0, grads, lr=1e-2, impl=impl)
    with_tensor, _ = run_torch(params0, grads, lr=torch.tensor(1e-2), impl=impl)
    for a, b in zip(with_tensor, with_float):
        if impl == "for-loop":
            assert torch.equal(a, b)  # a CPU tensor lr is read once per step: the same floats
        else:
            assert rel_err(a, b.detach().double().numpy()) <= 1e-6


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_param_groups_keep_their_own_hyperparameters(impl):
    shapes_a, shapes_b = [(3, 2), (4,)], [(5,)]
    grads = gradient_sequence(100, shapes=shapes_a + shapes_b, seed=4)
    pa, pb = initial_params(shapes_a), initial_params(shapes_b, seed=9)
    a = [p.clone().requires_grad_(True) for p in pa]
    b = [p.clone().requires_grad_(True) for p in pb]
    opt = IMPLEMENTATIONS[impl](
        [{"params": a}, {"params": b, "lr": 3e-2, "weight_decay": 0.1, "betas": (0.8, 0.9)}],
        lr=1e-3,
    )
    for step_grads in grads:
        for p, gr in zip(a + b, step_grads):
            p.grad = gr.clone()
        opt.step()
    ref_a = run_reference(pa, [g[:2] for g in grads], lr=1e-3)
    ref_b = run_reference(pb, [g[2:] for g in grads], lr=3e-2, weight_decay=0.1, betas=(0.8, 0.9))
    assert_matches_reference(a, opt, ref_a, tol=1e-12)
    assert_matches_reference(b, opt, ref_b, tol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_zero_grads_with_zero_lr_leave_params_unchanged(impl):
    params = [p.requires_grad_(True) for p in initial_params()]
    before = [p.detach().clone() for p in params]
    opt = IMPLEMENTATIONS[impl](params, lr=0.0, weight_decay=0.5)
    for _ in range(5):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
        assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_loss_goes_down_or_up_with_maximize(impl, maximize):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = IMPLEMENTATIONS[impl](model.parameters(), lr=1e-2, maximize=maximize)

    def loss_fn():
        return torch.nn.functional.mse_loss(model(x), y)

    first = loss_fn().item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    last = loss_fn().item()
    assert (last > 1.5 * first) if maximize else (last < 0.5 * first)


def test_first_step_has_m_equal_g_and_v_equal_g_squared():
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([3.0, -0.5, 1e-3], dtype=torch.float64)
    for impl in IMPLEMENTATIONS.values():
        q = p.detach().clone().requires_grad_(True)
        q.grad = p.grad.clone()
        opt = impl([q], lr=0.1, weight_decay=0.0, eps=0.0)
        opt.step()
        assert torch.equal(opt.state[q]["exp_avg"], p.grad)
        assert torch.equal(opt.state[q]["exp_avg_sq"], p.grad**2)
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy() - 0.1 * np.sign(p.grad.numpy()), rtol=1e-15)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_torch_compile_step_matches_eager(impl):
    grads = gradient_sequence(30, dtype=torch.float32, seed=8)
    params0 = initial_params(dtype=torch.float32)
    eager, _ = run_torch(params0, grads, lr=1e-2)
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = IMPLEMENTATIONS[impl](params, lr=1e-2)
    compiled_step = torch.compile(opt.step)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        compiled_step()
    for a, b in zip(params, eager):
        assert rel_err(a, b.detach().double().numpy()) <= 1e-6
    assert opt.state[params[0]]["step"].item() == len(grads)


@pytest.mark.parametrize("shape_count", [len(SHAPES)])
def test_differentiable_step_passes_gradcheck(shape_count):
    """Autograd through one step, w.r.t. the param, its grad and the moments (torch's own _diff_fn pattern)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    exp_avg = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    exp_avg_sq = torch.rand(4, dtype=torch.float64, generator=g).add_(0.1).requires_grad_(True)

    def one_step(p, grad, exp_avg, exp_avg_sq):
        p = p.clone()
        p.grad = grad
        opt = AdamNX([p], lr=0.1, differentiable=True)
        opt.state[p].update(
            {
                "step": torch.tensor(3.0, dtype=torch.float64),
                "exp_avg": exp_avg.clone(),
                "exp_avg_sq": exp_avg_sq.clone(),
            }
        )
        opt.step()
        return p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]

    assert torch.autograd.gradcheck(one_step, (p, grad, exp_avg, exp_avg_sq))
