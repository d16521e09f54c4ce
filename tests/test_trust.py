"""Numerics, low precision, non-finite gradients, long runs, bad input and the late-activation hazard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from adamnx import AdamNX
from adamnx.functional import stochastic_round_to_bf16
from adamnx.reference import AdamNXReference
from helpers import (
    IMPLEMENTATIONS,
    assert_matches_reference,
    gradient_sequence,
    implementations,
    initial_params,
    rel_err,
    run_reference,
    run_torch,
)

NOT_CAPTURABLE = implementations(capturable=False)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("impl", NOT_CAPTURABLE)
def test_float32_state_for_bf16_params_tracks_the_reference(impl):
    grads = gradient_sequence(200, dtype=torch.bfloat16, seed=1)
    params0 = initial_params(dtype=torch.bfloat16)
    ref = run_reference(params0, grads, lr=1e-2)
    pure, pure_opt = run_torch(params0, grads, lr=1e-2, impl=impl)
    wide, opt = run_torch(params0, grads, lr=1e-2, state_dtype=torch.float32, impl=impl)
    for i, p in enumerate(wide):
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
        # m and v depend only on the gradients: in float32 they match the float64 reference to float32 accuracy,
        # where bf16 moments carry 8 bits; the param itself carries bf16's rounding, once per step.
        assert rel_err(opt.state[p]["exp_avg_sq"], ref.v[i]) <= 1e-5
        assert rel_err(opt.state[p]["exp_avg"], ref.m[i]) <= 1e-5
        assert rel_err(p, ref.theta[i]) <= 5e-2
    pure_v_err = max(rel_err(pure_opt.state[q]["exp_avg_sq"], ref.v[i]) for i, q in enumerate(pure))
    assert pure_v_err > 1e-3


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_float32_state_survives_a_checkpoint_exactly(impl):
    import io

    p = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    opt = IMPLEMENTATIONS[impl]([p], state_dtype=torch.float32, stochastic_rounding=True)
    for _ in range(3):
        p.grad = torch.randn(4, 3).bfloat16()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = IMPLEMENTATIONS[impl]([p], state_dtype=torch.float32, stochastic_rounding=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))  # torch.dtype in the groups is allowed
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[p][key].dtype == torch.float32  # torch's loader would have cast them to bf16
        assert torch.equal(fresh.state[p][key], opt.state[p][key])
    p.grad = torch.randn(4, 3).bfloat16()
    fresh.step()


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # a quarter of the way from bf16 1.0 to 1.0078125
    r = stochastic_round_to_bf16(x)
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert r.float().mean().item() == pytest.approx(x[0].item(), abs=2e-5)
    exact = torch.tensor([1.0, -2.5, 0.0, 2.0**100])  # already bf16 values: SR leaves them alone
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact.bfloat16().float())


def _non_finite() -> torch.Tensor:
    """inf, −inf, and NaNs whose payload bits are all set (adding noise would carry out of them: ±0 or inf)."""
    bits = torch.tensor([0x7F800000, -0x00800000, 0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32)
    return bits.view(torch.float32).repeat(1_000)


def test_stochastic_rounding_keeps_inf_and_nan():
    x = _non_finite()
    r = stochastic_round_to_bf16(x).float()
    assert torch.equal(r[:2], x[:2]) and r.view(-1, 5)[:, 2:].isnan().all()


@pytest.mark.parametrize("impl", NOT_CAPTURABLE)
def test_a_non_finite_gradient_stays_non_finite_in_bf16_moments(impl):
    """A NaN gradient gives NaN moments (never a finite 0 that would hide it), with bf16 state as with float32."""
    grad = _non_finite()
    p = torch.zeros_like(grad, requires_grad=True)
    opt = IMPLEMENTATIONS[impl]([p], state_dtype=torch.bfloat16)
    p.grad = grad
    opt.step()
    for key in ("exp_avg", "exp_avg_sq"):
        assert not opt.state[p][key].float().isfinite().any(), key


@pytest.mark.parametrize("impl", NOT_CAPTURABLE)
def test_stochastic_rounding_keeps_updates_smaller_than_half_an_ulp(impl):
    """Updates of lr = 1e-3 on params near 4 (bf16 ulp 1/32): round-to-nearest loses them all, SR keeps them."""
    n, steps, lr = 20_000, 20, 1e-3
    torch.manual_seed(0)
    expected = 4.0 - steps * lr  # every step moves each param by −lr·sign(g) = −lr (g > 0, first steps ≈ sign)
    results = {}
    for sr in (False, True):
        p = torch.full((n,), 4.0, dtype=torch.bfloat16, requires_grad=True)
        opt = IMPLEMENTATIONS[impl]([p], lr=lr, weight_decay=0.0, stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)
            opt.step()
        results[sr] = p.detach().float().mean().item()
    assert results[False] == 4.0  # every update rounded away
    assert results[True] == pytest.approx(expected, abs=2e-3)


def _unit_gaussian_run(steps: int, change_at: int, n: int = 20_000):
    """Gradients N(0, 1), then N(0, 0.1²) from step ``change_at`` on (v must then come down: the decrease that
    round-to-nearest loses)."""
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(n, generator=gen) * (1.0 if t < change_at else 0.1) for t in range(steps)]


def _v_mean(impl, grads, state_dtype, param_dtype):
    torch.manual_seed(1)  # stochastic rounding's draws
    p = torch.zeros(grads[0].numel(), dtype=param_dtype, requires_grad=True)
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-3, betas=(0.9, 0.99), state_dtype=state_dtype)
    means = []
    for g in grads:
        p.grad = g.to(param_dtype)
        opt.step()
        means.append(opt.state[p]["exp_avg_sq"].double().mean().item())
    return means


def _v_mean_rounded_to_nearest(grads, betas=(0.9, 0.99)):
    """What bf16 moments rounded to nearest give (every release before stochastic moments): v's recursion alone."""
    from adamnx.schedule import coefficients

    v = torch.zeros(grads[0].numel(), dtype=torch.bfloat16)
    means = []
    for t, g in enumerate(grads, start=1):
        _, w2 = coefficients(float(t), betas)
        v = (v.float() * (1.0 - w2) + w2 * g * g).bfloat16()
        means.append(v.double().mean().item())
    return means


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["f32-params", "bf16-params"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bf16_moments_stay_unbiased_where_round_to_nearest_drifts(impl, param_dtype):
    """AdamNX's 1 − β̂2_t ≈ 1/t: past t ≈ 256 a decrease of v is below half a bf16 ulp. Rounded to nearest, v's mean
    ends 31% high after 1,000 steps of N(0, 1) gradients and does not come down when they shrink; rounded
    stochastically it tracks float32 state within 2%, before and after the change of scale."""
    grads = _unit_gaussian_run(2_000, change_at=1_000)
    exact = _v_mean(impl, grads, torch.float32, torch.float32)
    compact = _v_mean(impl, grads, torch.bfloat16, param_dtype)
    nearest = _v_mean_rounded_to_nearest(grads)
    for t in (998, 1_999):  # after 999 steps, and 1,000 steps after the scale fell tenfold
        assert compact[t] == pytest.approx(exact[t], rel=0.02), t
        assert nearest[t] > 1.25 * exact[t], t  # the drift this replaced
    assert nearest[-1] > 2 * exact[-1]


# --------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_skip_nonfinite_leaves_the_group_untouched_and_counts(impl):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = IMPLEMENTATIONS[impl]([{"params": [a]}, {"params": [b]}], lr=0.1, skip_nonfinite=True)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    state_a = {k: v.clone() for k, v in opt.state[a].items()}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.tensor([1.0, float("nan"), 1.0]), torch.ones(2)
    opt.step()
    assert torch.equal(a.detach(), a_before)
    for key, value in state_a.items():
        assert torch.equal(opt.state[a][key], value), key
    assert opt.param_groups[0]["skipped_steps"] == 1 and "skipped_steps" not in opt.param_groups[1]
    assert not torch.equal(b.detach(), b_before) and opt.state[b]["step"].item() == 2


def test_without_skip_nonfinite_nan_propagates_like_torch():
    p = torch.nn.Parameter(torch.ones(2))
    opt, adamw_p = AdamNX([p]), torch.nn.Parameter(torch.ones(2))
    adamw = torch.optim.AdamW([adamw_p])
    p.grad = adamw_p.grad = torch.tensor([float("inf"), 1.0])
    opt.step()
    adamw.step()
    assert torch.isnan(p).any() == torch.isnan(adamw_p).any()


@pytest.mark.parametrize("fused", [False, True])
def test_skip_nonfinite_with_grad_scaler(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = AdamNX(model.parameters(), lr=1e-2, skip_nonfinite=True, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
        if step == 1:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    assert opt.state[model.weight]["step"].item() == 2  # the inf step skipped (by the scaler), no crash
    assert torch.isfinite(model.weight).all()


# --------------------------------------------------------------------------- long runs


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("beta2", [0.9, 0.99, 0.999, 0.9999])
@pytest.mark.parametrize("step", [1e4, 1e6, 1e9])
@pytest.mark.parametrize("cold", [False, True])
def test_no_nan_or_inf_at_huge_step_counts(impl, beta2, step, cold):
    """At any t: finite coefficients and bounded updates for coordinates with a history; a coordinate with
    none (v = 0) is bounded too when per_coordinate_steps is on (without it, see the late-activation tests)."""
    torch.manual_seed(0)
    lr = 1e-3
    p = torch.nn.Parameter(torch.randn(5))
    opt = IMPLEMENTATIONS[impl]([p], lr=lr, betas=(0.9, beta2), per_coordinate_steps=cold)
    p.grad = torch.randn(5)
    opt.step()
    saved = opt.state_dict()  # then at step t; cold: no coordinate has a history (and none has started)
    saved["state"][0]["step"] = torch.tensor(step, dtype=torch.float64)
    if cold:
        for key in ("exp_avg", "exp_avg_sq", "coord_step"):
            saved["state"][0][key] = torch.zeros_like(saved["state"][0][key])
    opt.load_state_dict(saved)
    before = p.detach().clone()
    p.grad = torch.randn(5)
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg_sq"]).all()
    assert opt.state[p]["step"].item() == step + 1
    assert (p.detach() - before).abs().max().item() <= 10 * lr


def test_cold_coordinate_past_the_horizon_gets_lr_over_eps_without_the_mitigation():
    """Past t ≫ H, 1 − β̂2_t underflows to exactly 0: a coordinate with no history keeps v = 0 and its update is
    lr·m/ε — the late-activation hazard at its worst. This pins the behaviour that the README warns about."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AdamNX([p], lr=1e-3, betas=(0.9, 0.9), eps=1e-8, weight_decay=0.0)
    p.grad = torch.zeros(1, dtype=torch.float64)
    opt.step()
    opt.state[p]["step"].fill_(1_000_000)  # t·log c ≈ −10⁴: c^t is 0 even in float64
    p.grad = torch.ones(1, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg_sq"].item() == 0.0
    assert abs(p.item()) == pytest.approx(1e-3 * 0.1 / 1e-8, rel=1e-6)  # 10,000 × lr


# --------------------------------------------------------------------------- late activation


def _late_activation_update(impl, restart: bool, t_late: int = 20_000) -> float:
    """Largest |Δθ|/lr of a coordinate whose first gradient arrives at step t_late (β2 = 0.99)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    lr = 1e-3
    opt = impl([p], lr=lr, weight_decay=0.0, per_coordinate_steps=restart)
    p.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()  # coordinate 0 has a history, coordinate 1 has never had a gradient
    opt.state[p]["step"].fill_(t_late - 1)
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()
    return (p.detach() - before)[1].abs().item() / lr


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_late_activation_hazard_and_its_mitigation(impl):
    from adamnx.schedule import coefficients

    w1, w2 = coefficients(20_000, (0.9, 0.99))
    expected = w1 / (math.sqrt(w2) + 1e-8)  # m = (1−β1_t) g, v = (1−β̂2_t) g²: ≈ 0.1/√(1 − β̂2_t) ≈ 25
    assert _late_activation_update(IMPLEMENTATIONS[impl], restart=False) == pytest.approx(expected, rel=1e-6)
    assert expected > 25
    assert _late_activation_update(IMPLEMENTATIONS[impl], restart=True) == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------- bad input and odd params


def test_param_cast_after_state_creation_gives_a_clear_error():
    model = torch.nn.Linear(3, 2)
    opt = AdamNX(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"moved or cast after the state was created.*load_state_dict"):
        opt.step()
    opt.load_state_dict(opt.state_dict())  # the advertised fix: state follows the params
    opt.step()
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("state_dtype", [torch.int32, "float32"])
def test_state_dtype_is_validated(state_dtype):
    with pytest.raises(ValueError, match=r"state_dtype must be a floating-point torch\.dtype"):
        AdamNX([torch.nn.Parameter(torch.ones(2))], state_dtype=state_dtype)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize(
    "case",
    ["zero-size", "non-contiguous", "channels-last", "huge-grads", "tiny-grads", "beta1-zero", "lr-zero"],
)
def test_odd_params_and_values_match_the_reference(impl, case):
    g = torch.Generator().manual_seed(0)
    kwargs = {"lr": 1e-2}
    if case == "zero-size":
        params0 = [torch.zeros(0, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64, generator=g)]
    elif case == "non-contiguous":
        params0 = [torch.randn(6, 8, dtype=torch.float64, generator=g)[:, ::2]]
    elif case == "channels-last":
        params0 = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)]
    else:
        params0 = [torch.randn(3, 5, dtype=torch.float64, generator=g)]
    scale = {"huge-grads": 1e30, "tiny-grads": 1e-30}.get(case, 1.0)
    grads = [[torch.randn_like(p) * scale for p in params0] for _ in range(30)]
    if case == "beta1-zero":
        kwargs["betas"] = (0.0, 0.99)
    if case == "lr-zero":
        kwargs["lr"] = 0.0
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = IMPLEMENTATIONS[impl](params, **kwargs)
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
    ref = run_reference(params0, grads, **kwargs)
    if case == "tiny-grads":
        # v ~ 1e-60 ≪ eps²: the update is ≈ lr·g/eps ≈ 1e-24; params compare, moments are relative anyway
        pass
    assert_matches_reference(params, opt, ref, tol=1e-12)
    if case == "channels-last":
        assert params[0].is_contiguous(memory_format=torch.channels_last)
        assert opt.state[params[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- fuzzing


class OptimizerSequence(RuleBasedStateMachine):
    """Random sequences of step / zero_grad / add_param_group / state_dict round trip / lr change, each checked
    against reference optimizers (one per param group) fed the same gradients."""

    def __init__(self):
        super().__init__()
        self.impl = None
        self.params: list[torch.Tensor] = []
        self.refs: list[tuple[AdamNXReference, list[int]]] = []  # one reference per group, with param indices
        self.gen = torch.Generator().manual_seed(0)
        self.opt = None

    @rule(impl=st.sampled_from(list(IMPLEMENTATIONS)), size=st.integers(1, 4), lr=st.sampled_from([1e-3, 1e-2]))
    @precondition(lambda self: self.opt is None)
    def create(self, impl, size, lr):
        self.impl = IMPLEMENTATIONS[impl]
        p = torch.randn(size, dtype=torch.float64, generator=self.gen).requires_grad_(True)
        self.params = [p]
        self.opt = self.impl([p], lr=lr)
        self.refs = [(AdamNXReference([p.detach().numpy()], lr=lr), [0])]

    @rule(size=st.integers(1, 4), lr=st.sampled_from([3e-3, 3e-2]), wd=st.sampled_from([0.0, 0.1]))
    @precondition(lambda self: self.opt is not None and len(self.refs) < 3)
    def add_group(self, size, lr, wd):
        p = torch.randn(size, dtype=torch.float64, generator=self.gen).requires_grad_(True)
        self.opt.add_param_group({"params": [p], "lr": lr, "weight_decay": wd})
        self.refs.append((AdamNXReference([p.detach().numpy()], lr=lr, weight_decay=wd), [len(self.params)]))
        self.params.append(p)

    @rule(skip=st.integers(0, 3))
    @precondition(lambda self: self.opt is not None)
    def step(self, skip):
        grads = []
        for i, p in enumerate(self.params):
            g = None if i == skip else torch.randn(p.shape, dtype=torch.float64, generator=self.gen)
            p.grad = g
            grads.append(g)
        self.opt.step()
        for ref, idx in self.refs:
            ref.step([None if grads[i] is None else grads[i].numpy() for i in idx])

    @rule()
    @precondition(lambda self: self.opt is not None)
    def zero_grad(self):
        self.opt.zero_grad()

    @rule(factor=st.sampled_from([0.5, 2.0]))
    @precondition(lambda self: self.opt is not None)
    def change_lr(self, factor):
        for group, (ref, _) in zip(self.opt.param_groups, self.refs):
            group["lr"] *= factor
            ref.lr *= factor

    @rule()
    @precondition(lambda self: self.opt is not None)
    def save_and_load(self):
        import io

        buffer = io.BytesIO()
        torch.save(self.opt.state_dict(), buffer)
        buffer.seek(0)
        groups = [
            {"params": [p], **{k: v for k, v in g.items() if k != "params"}}
            for p, g in zip(self.params, self.opt.param_groups)
        ]
        fresh = self.impl(groups)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        self.opt = fresh

    @invariant()
    def matches_reference(self):
        if self.opt is None:
            return
        for ref, idx in self.refs:
            for j, i in enumerate(idx):
                p = self.params[i]
                np.testing.assert_allclose(p.detach().numpy(), ref.theta[j], rtol=1e-12, atol=1e-15)
                if ref.t[j]:
                    assert self.opt.state[p]["step"].item() == ref.t[j]


OptimizerSequence.TestCase.settings = settings(
    max_examples=40, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_random_sequences_match_the_reference = OptimizerSequence.TestCase
