"""The fused path (both kernels: C++ on the CPU, inductor as on CUDA): GradScaler's grad_scale/found_inf, low-precision params, layouts, and CUDA (skipped without it)."""

from __future__ import annotations

import pytest
import torch

from adamnx import AdamNX
from helpers import IMPLEMENTATIONS, gradient_sequence, implementations, initial_params, rel_err, run_torch


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


@pytest.mark.parametrize("kernel", implementations(amp=True))
def test_fused_with_grad_scaler_matches_unscaled_loop_and_skips_inf_steps(kernel):
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    scaled_model, plain_model = _model(), _model()
    fused = IMPLEMENTATIONS[kernel](scaled_model.parameters(), lr=1e-2)
    loop = AdamNX(plain_model.parameters(), lr=1e-2, foreach=False)
    assert fused._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for step in range(12):
        fused.zero_grad()
        loop.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(scaled_model(x), y)).backward()
        torch.nn.functional.mse_loss(plain_model(x), y).backward()
        if step == 6:  # an overflow: the scaler must skip the whole step
            next(scaled_model.parameters()).grad[0, 0] = float("inf")
            before = {k: v.clone() for k, v in fused.state_dict()["state"][0].items()}
            params_before = [p.detach().clone() for p in scaled_model.parameters()]
            scale_before = scaler.get_scale()
            scaler.step(fused)
            scaler.update()
            after = fused.state_dict()["state"][0]
            for key in before:
                assert torch.equal(before[key], after[key]), key
            for p, q in zip(scaled_model.parameters(), params_before):
                assert torch.equal(p.detach(), q)
            assert scaler.get_scale() == scale_before / 2
            continue
        scaler.step(fused)
        scaler.update()
        loop.step()
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        assert rel_err(p, q.detach().double().numpy()) <= 1e-6
    assert fused.state[next(scaled_model.parameters())]["step"].item() == 11  # the skipped step did not count


@pytest.mark.parametrize("kernel", implementations(amp=True))
def test_fused_after_unscale_uses_found_inf_only(kernel):
    model = _model()
    opt = IMPLEMENTATIONS[kernel](model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(model(torch.randn(4, 6)).sum()).backward()
    scaler.unscale_(opt)  # grads are now true gradients; the optimizer gets grad_scale=None
    grads = [p.grad.clone() for p in model.parameters()]
    reference = _model()
    ref_opt = AdamNX(reference.parameters(), lr=1e-2, foreach=False)
    for p, g in zip(reference.parameters(), grads):
        p.grad = g
    scaler.step(opt)
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert rel_err(p, q.detach().double().numpy()) <= 1e-6


@pytest.mark.parametrize("kernel", implementations(amp=True))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_params_use_float32_math_and_round_once(dtype, kernel):
    """One fused step on bf16/fp16 = the float32 for-loop step on upcast copies, rounded once to the dtype."""
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(1000, generator=g).to(dtype), torch.randn(1000, generator=g).to(dtype)
    m, v = (torch.randn(1000, generator=g) * 0.1).to(dtype), torch.rand(1000, generator=g).to(dtype)
    state = {"step": torch.tensor(4.0, dtype=torch.float64), "exp_avg": m, "exp_avg_sq": v}

    def one_step(param, grad, state, impl):
        param = param.clone().requires_grad_(True)
        param.grad = grad.clone()
        opt = IMPLEMENTATIONS[impl]([param], lr=1e-2)
        opt.state[param].update({k: t.clone() for k, t in state.items()})
        opt.step()
        return param.detach(), opt.state[param]

    fused, fused_state = one_step(p, grad, state, kernel)
    upcast = {k: (t.float() if k != "step" else t) for k, t in state.items()}
    exact, exact_state = one_step(p.float(), grad.float(), upcast, "for-loop")
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one unit in the last place, relative
    assert fused.dtype == dtype and fused_state["exp_avg_sq"].dtype == dtype
    torch.testing.assert_close(fused.float(), exact.to(dtype).float(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(
        fused_state["exp_avg"].float(), exact_state["exp_avg"].to(dtype).float(), rtol=ulp, atol=1e-6
    )


@pytest.mark.parametrize("kernel", implementations(amp=True))
def test_fused_handles_channels_last_and_non_contiguous_params(kernel):
    torch.manual_seed(0)
    conv = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    strided = torch.randn(6, 8)[:, ::2]  # not dense: runs the same kernel eagerly
    params0 = [conv, strided, torch.randn(1), torch.randn(0, 3)]
    grads = [[torch.randn_like(p) for p in params0] for _ in range(20)]
    fused, _ = run_torch(params0, grads, impl=kernel, lr=1e-2)
    loop, _ = run_torch(params0, grads, impl="for-loop", lr=1e-2)
    for f, lp in zip(fused, loop):
        assert rel_err(f, lp.detach().double().numpy()) <= 1e-6


@pytest.mark.parametrize("kernel", ["fused-inductor"])
def test_fused_does_not_recompile_for_new_steps_lrs_or_shapes(kernel):
    """After the first step (which compiles, or finds the kernel an earlier test compiled), no step compiles again."""
    from torch._dynamo.utils import counters

    compiled_after_first_step = None
    for shapes in ([(17,), (3, 4)], [(100,), (2, 50)]):
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        opt = IMPLEMENTATIONS[kernel](params)
        for lr in (1e-3, 2e-3, 5e-4):
            opt.param_groups[0]["lr"] = lr
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            if compiled_after_first_step is None:
                compiled_after_first_step = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == compiled_after_first_step  # new steps, lrs, shapes: no graph


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", [{"fused": True}, {"capturable": True}, {"capturable": True, "foreach": True}])
def test_cuda_graph_capture_matches_eager(impl):
    torch.manual_seed(0)
    params0 = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    grads = [[torch.randn_like(p) for p in params0] for _ in range(10)]
    eager = [p.clone().requires_grad_(True) for p in params0]
    eager_opt = AdamNX(eager, lr=1e-2, **impl)
    for step in grads:
        for p, g in zip(eager, step):
            p.grad = g.clone()
        eager_opt.step()

    captured = [p.clone().requires_grad_(True) for p in params0]
    for p in captured:
        p.grad = torch.zeros_like(p)
    opt = AdamNX(captured, lr=torch.tensor(1e-2, device="cuda"), **impl)
    opt.step()  # warm-up: creates state (and compiles the fused kernel) outside the capture
    with torch.no_grad():
        for p, q in zip(captured, params0):
            p.copy_(q)
    for state in opt.state.values():
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        state["step"].zero_()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    # capture recorded (but did not run) one step; undo nothing, replay once per gradient
    for step in grads:
        for p, g in zip(captured, step):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.gpu
def test_fused_cuda_matches_loop():
    grads = [[g.cuda() for g in step] for step in gradient_sequence(200, dtype=torch.float32)]
    params0 = [p.cuda() for p in initial_params(dtype=torch.float32)]
    fused, _ = run_torch(params0, grads, lr=1e-2, fused=True)
    loop, _ = run_torch(params0, grads, lr=1e-2, foreach=False)
    for f, lp in zip(fused, loop):
        assert rel_err(f, lp.detach().double().cpu().numpy()) <= 1e-6
