"""8-bit state: the format (adamnx.quantized), AdamNX8bit on every implementation that steps it, its checkpoints and
conversions, the guard, GradScaler, torch.compile, gradient release, and malformed state refused intact."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import adamnx
from adamnx import AdamNX, AdamNX8bit, backends, quantized
from adamnx.quantized import BLOCK, dequantize, quantize
from adamnx.schedule import coefficients
from helpers import IMPLEMENTATIONS, implementations, without_options

QUANTIZED = implementations(quantized_state=True)
# The gap between a code and the next one, at most (at the top of a block), relative to the block's largest:
# 1 − (126/127)⁴ for m, 1 − (254/255)⁴ for v.
GAP = {True: 0.0313, False: 0.0157}
SMALLEST_V = (1 / 255) ** 4  # v's smallest non-zero code, relative to its block's largest
# The accelerator kernel compiles with TorchInductor (C++ on the CPU, ~30 s): the tests that need it most run it.
EAGER = [name for name in QUANTIZED if name != "fused-inductor"]


def make(impl: str, params, **kwargs) -> AdamNX8bit:
    """AdamNX8bit running implementation ``impl``'s row (on the CPU too), as helpers.IMPLEMENTATIONS does AdamNX."""
    row = IMPLEMENTATIONS[impl]

    def step(self, closure=None):
        with backends.selected(row.backend.name):
            return AdamNX8bit.step(self, closure)

    cls = type(f"AdamNX8bit_{row.backend.name}", (AdamNX8bit,), {"step": step})
    return cls(params, **row.kwargs, **kwargs)


def _values(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return quantized.moments_of(state, torch.float64)


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize("signed", [True, False], ids=["m", "v"])
def test_quantization_is_unbiased_picks_a_neighbouring_code_and_keeps_each_block_largest(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * BLOCK + 17, generator=g) * torch.logspace(-4, 0, 3 * BLOCK + 17)
    x[5] = 0.0
    if not signed:
        x = x * x
    draws = []
    for _ in range(400):
        codes, scales = quantize(x, signed)
        assert codes.dtype == (torch.int8 if signed else torch.uint8) and codes.shape == x.shape
        assert scales.shape == (quantized.blocks_of(x.numel()),)
        assert not signed or (codes != -128).all()
        draws.append(dequantize(codes, scales).double())
    stack = torch.stack(draws)
    blocks = torch.nn.functional.pad(x.abs().double(), (0, -x.numel() % BLOCK)).view(-1, BLOCK).amax(1)
    largest = blocks.repeat_interleave(BLOCK)[: x.numel()]
    # every draw is one of the two codes around the value: within one gap of the block's largest
    assert ((stack - x.double()).abs() <= GAP[signed] * largest).all()
    # unbiased: the summed error of the mean of 400 draws is within 4 standard errors, for the large values and,
    # apart, for the small ones (below 1% of their block's largest), whose errors the large ones would hide; but a
    # non-zero v below the smallest code is stored as the smallest code, never as 0
    error, variance = stack.mean(0) - x.double(), stack.var(0) / 400
    floored = (x != 0) & (x.abs() < SMALLEST_V * largest) if not signed else torch.zeros_like(x, dtype=torch.bool)
    assert (stack[:, floored] > 0).all()
    for part in (x.abs() >= 0.01 * largest, (x.abs() < 0.01 * largest) & ~floored):
        assert error[part].sum().abs() <= 4 * variance[part].sum().sqrt()
    # a block's largest magnitude and zeros are exact
    assert torch.equal(scales.double(), blocks)
    assert draws[0][5] == 0


def test_a_block_with_inf_or_nan_reads_as_nan_and_the_others_are_untouched():
    x = torch.ones(2 * BLOCK)
    x[3] = float("nan")
    codes, scales = quantize(x, signed=True)
    values = dequantize(codes, scales)
    assert values[:BLOCK].isnan().all() and torch.equal(values[BLOCK:], x[BLOCK:])


# --------------------------------------------------------------------------- the optimizer, on every implementation


def _unit_gaussian_grads(steps: int, change_at: int, n: int = 8 * BLOCK) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) * (1.0 if t < change_at else 0.1) for t in range(steps)]


def _v_means(opt_factory, grads) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(grads[0].numel()))
    opt = opt_factory([p])
    means = []
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
        means.append(_values(opt.state[p])[1].mean().item())
    return means


def _v_means_rounded_to_nearest(grads, betas=(0.9, 0.99)) -> list[float]:
    """v kept in the 8-bit format but rounded to the nearest code (noise fixed at the middle): what stochastic rounding
    replaced."""
    codes, scales = quantize(torch.zeros(grads[0].numel()), signed=False)
    means = []
    for t, g in enumerate(grads, start=1):
        _, w2 = coefficients(float(t), betas)
        v = dequantize(codes, scales) * (1.0 - w2) + w2 * g * g
        codes, scales = quantize(v, signed=False, noise=torch.full(v.shape, 1 << 15, dtype=torch.int32))
        means.append(dequantize(codes, scales).double().mean().item())
    return means


@pytest.mark.parametrize("impl", QUANTIZED)
def test_v_tracks_float32_state_where_round_to_nearest_stalls(impl):
    """AdamNX's 1 − β̂2_t ≈ 1/t: after a few dozen steps a step's change of v is below half the gap between two
    codes. Rounded stochastically, v's mean tracks float32 state within 2%, before and after the gradients' scale
    falls tenfold; rounded to the nearest code it drifts upwards (+13% after 1,500 steps) and keeps that bias."""
    grads = _unit_gaussian_grads(3_000, change_at=1_500)
    exact = _v_means(lambda ps: AdamNX(ps, foreach=False), grads)
    compact = _v_means(lambda ps: make(impl, ps), grads)
    nearest = _v_means_rounded_to_nearest(grads)
    for t in (1_499, 2_999):
        assert compact[t] == pytest.approx(exact[t], rel=0.02), t
        assert nearest[t] > 1.08 * exact[t], t  # the drift stochastic rounding prevents


def _regression(opt_factory, steps=300, seed=0):
    """A noisy linear regression (a 64 × 128 weight, 8,192 elements: quantized) and a bias (kept in float32)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(128, 64)
    truth = torch.randn(64, 128) / 11
    g = torch.Generator().manual_seed(seed + 1)
    opt = opt_factory(model.parameters())
    for _ in range(steps):
        x = torch.randn(32, 128, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), x @ truth.T + 0.1 * torch.randn(32, 64, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, (model.weight.detach() - truth).pow(2).mean().item()


@pytest.mark.parametrize("impl", QUANTIZED)
def test_8bit_trains_like_float32_adamnx(impl):
    """The same regression with float32 and 8-bit moments: the weights land within a few percent of each other (of
    the distance they travelled), the error to the truth within 10%; the bias keeps float32 moments."""
    start, _, _ = _regression(lambda ps: AdamNX(ps, lr=1e-2, foreach=False), steps=0)
    exact, _, exact_error = _regression(lambda ps: AdamNX(ps, lr=1e-2, foreach=False))
    compact, opt, compact_error = _regression(lambda ps: make(impl, ps, lr=1e-2))
    travelled = (exact.weight - start.weight).norm()
    assert (compact.weight - exact.weight).norm() / travelled < 0.05
    assert compact_error == pytest.approx(exact_error, rel=0.10)
    assert opt.state[compact.weight]["exp_avg_codes"].dtype == torch.int8
    assert opt.state[compact.bias]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in opt.state[compact.bias]


def test_which_params_are_quantized_and_the_bytes_they_keep():
    big, small = torch.nn.Parameter(torch.zeros(1 << 20)), torch.nn.Parameter(torch.zeros(100))
    wide = torch.nn.Parameter(torch.zeros(5000, dtype=torch.float64))
    opt = AdamNX8bit([big, small, wide], min_8bit_size=4096)
    for p in (big, small, wide):
        p.grad = torch.ones_like(p)
    opt.step()
    kept = sum(t.numel() * t.element_size() for k, t in opt.state[big].items() if k != "step")
    assert kept / big.numel() <= 2.1  # measured from the tensors the state holds: 2.03
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and opt.state[wide]["exp_avg"].dtype == torch.float64
    assert quantized.state_bytes_per_param(big.numel()) == pytest.approx(kept / big.numel())
    tiny = AdamNX8bit([small], min_8bit_size=64)
    small.grad = torch.ones(100)
    tiny.step()
    assert tiny.state[small]["exp_avg_codes"].dtype == torch.int8


def test_bad_options_are_refused():
    p = torch.nn.Parameter(torch.zeros(4))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="min_8bit_size"):
            AdamNX8bit([p], min_8bit_size=bad)
    with pytest.raises(ValueError, match="differentiable"):
        AdamNX8bit([p], differentiable=True)
    opt = AdamNX8bit([p])
    with pytest.raises(ValueError, match="differentiable"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "differentiable": True})
    assert len(opt.param_groups) == 1


def test_a_row_that_cannot_step_8bit_state_is_refused_at_construction():
    row = backends.Backend("no-8bit", lambda plan: None, {"fused": False, "foreach": True}, devices=("cpu",))
    backends.register(row, before="foreach")
    try:
        with pytest.raises(ValueError, match="'no-8bit' does not step 8-bit moments"):
            AdamNX8bit([torch.nn.Parameter(torch.zeros(4))], foreach=True)
    finally:
        backends.unregister("no-8bit")


# --------------------------------------------------------------------------- checkpoints


def _trained(impl: str, steps: int = 5, **kwargs):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(64, 100)), torch.nn.Parameter(torch.randn(7))
    opt = make(impl, [w, b], lr=1e-2, **kwargs)
    _steps(opt, [w, b], steps, seed=1)
    return opt, [w, b]


def _steps(opt, params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("impl", EAGER)
def test_a_checkpoint_round_trips_bitwise_and_the_run_continues_bitwise(impl):
    opt, params = _trained(impl)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    assert set(saved["state"][0]) == {
        "step",
        "exp_avg_codes",
        "exp_avg_sq_codes",
        "exp_avg_absmax",
        "exp_avg_sq_absmax",
    }
    torch.manual_seed(7)
    _steps(opt, params, 4, seed=2)
    restored_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    other = make(impl, restored_params, lr=1e-2)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    for key, value in other.state_dict()["state"][0].items():
        assert torch.equal(value, saved["state"][0][key]), key
    torch.manual_seed(7)
    _steps(other, restored_params, 4, seed=2)
    for p, q in zip(params, restored_params):
        assert torch.equal(p, q)
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, other.state[restored_params[0]][key]), key


def test_float_checkpoints_convert_into_8bit_and_back():
    """AdamNX → AdamNX8bit: each moment within one code of its value (≤ 3.1% of its block's largest for m, 1.6% for
    v); AdamNX8bit → AdamNX: exactly the values the codes hold, in float32."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 100))
    plain = AdamNX([w], lr=1e-2)
    _steps(plain, [w], 20, seed=1)
    m, v = plain.state[w]["exp_avg"].clone(), plain.state[w]["exp_avg_sq"].clone()
    compact = AdamNX8bit([w], lr=1e-2)
    compact.load_state_dict(plain.state_dict())
    state = compact.state[w]
    assert state["exp_avg_codes"].dtype == torch.int8 and state["step"].item() == 20
    for value, codes, scales in (
        (m, state["exp_avg_codes"], state["exp_avg_absmax"]),
        (v, *(state[k] for k in ("exp_avg_sq_codes", "exp_avg_sq_absmax"))),
    ):
        largest = scales.repeat_interleave(BLOCK)[: value.numel()].view(value.shape)
        assert ((dequantize(codes, scales) - value).abs() <= GAP[codes.dtype == torch.int8] * largest).all()
    back = AdamNX([w], lr=1e-2)
    back.load_state_dict(compact.state_dict())
    assert back.state[w]["exp_avg"].dtype == torch.float32
    assert torch.equal(back.state[w]["exp_avg"], dequantize(state["exp_avg_codes"], state["exp_avg_absmax"]))
    assert torch.equal(back.state[w]["exp_avg_sq"], dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"]))
    _steps(back, [w], 2, seed=3)  # and it trains on
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("trouble", ["overflow", "underflow"])
def test_8bit_state_into_float16_state_is_checked_piece_by_piece_and_refused_untouched(trouble, monkeypatch):
    """Loaded into AdamNX with float16 state, 8-bit moments must fit float16: checked a few blocks at a time (no
    full-size copy of a moment), so a block that does not fit is found wherever it is; the optimizer is untouched."""
    import adamnx._validation as validation

    monkeypatch.setattr(validation, "_SCAN_ELEMENTS", 2 * BLOCK)
    w = torch.nn.Parameter(torch.zeros(10 * BLOCK))
    compact = AdamNX8bit([w], lr=1e-2, min_8bit_size=BLOCK)
    grad = torch.full_like(w, 1.0)
    grad[-BLOCK:] = 1e3 if trouble == "overflow" else 1e-5  # only the last block: v = 1e6 (inf in fp16) or 1e-10 (0)
    w.grad = grad
    compact.step()
    target = AdamNX([torch.nn.Parameter(torch.zeros(10 * BLOCK))], lr=1e-2, state_dtype=torch.float16)
    _steps(target, target.param_groups[0]["params"], 1, seed=0)
    before = copy.deepcopy(target.state_dict())
    expected = "inf or NaN" if trouble == "overflow" else "non-zero values that are 0"
    with pytest.raises(ValueError, match=f"8-bit 'exp_avg_sq' holds {expected}"):
        target.load_state_dict(compact.state_dict())
    for key, value in target.state_dict()["state"][0].items():
        assert torch.equal(value, before["state"][0][key]), key


def test_8bit_moment_chunks_are_the_dequantized_moments():
    w = torch.nn.Parameter(torch.zeros(5 * BLOCK + 7))
    opt = AdamNX8bit([w], lr=1e-2, min_8bit_size=BLOCK)
    _steps(opt, [w], 3, seed=2)
    state = opt.state[w]
    for size in (BLOCK, 2 * BLOCK, 3 * BLOCK - 5, 100 * BLOCK):
        pieces = list(quantized.moment_chunks(state, size))
        for whole, part in zip(quantized.moments_of(state), zip(*pieces)):
            assert torch.equal(torch.cat(part), whole)


def test_state_dicts_of_the_first_8bit_version_still_load():
    """The first version saved the codes under exp_avg/exp_avg_sq (then the state's names too): they load into
    AdamNX8bit (the same state, bitwise) and into AdamNX (dequantized)."""
    opt, params = _trained("for-loop")
    saved = copy.deepcopy(opt.state_dict())
    legacy = {
        **saved,
        "state": {pid: {{"exp_avg_codes": "exp_avg", "exp_avg_sq_codes": "exp_avg_sq"}.get(k, k): v
                        for k, v in p_state.items()} for pid, p_state in saved["state"].items()},
    }  # fmt: skip
    assert legacy["state"][0]["exp_avg"].dtype == torch.int8
    other = AdamNX8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    other.load_state_dict(legacy)
    for key, value in other.state_dict()["state"][0].items():
        assert torch.equal(value, saved["state"][0][key]), key
    back = AdamNX([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    back.load_state_dict(legacy)
    state = opt.state[params[0]]
    assert torch.equal(
        back.state_dict()["state"][0]["exp_avg"], dequantize(state["exp_avg_codes"], state["exp_avg_absmax"])
    )


@pytest.mark.parametrize("direction", ["8bit into float32", "float32 into 8bit"])
def test_a_distributed_checkpoint_of_the_other_optimizer_is_refused_never_loaded_as_numbers(tmp_path, direction):
    """torch.distributed.checkpoint fills the loading optimizer's state dict by key and casts what it finds: were the
    codes saved as exp_avg, an AdamNX would load int8 codes as its moments (-96.0, 127.0, ...) without a word. The
    codes' own names make the checkpoint miss the keys the other optimizer asks for, which DCP refuses."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def make_opt(cls, model):
        return cls(model.parameters(), lr=1e-2, **({"min_8bit_size": 256} if cls is AdamNX8bit else {}))

    saving, loading = (AdamNX8bit, AdamNX) if direction == "8bit into float32" else (AdamNX, AdamNX8bit)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    source = make_opt(saving, model)
    for _ in range(3):
        model(torch.randn(8, 64)).square().sum().backward()
        source.step()
        source.zero_grad()
    _, optim_sd = get_state_dict(model, source)
    dcp.save({"optim": optim_sd}, checkpoint_id=str(tmp_path), no_dist=True)
    target_model = torch.nn.Linear(64, 64)
    target = make_opt(loading, target_model)
    _, target_sd = get_state_dict(target_model, target)  # creates the state (torch's fake step)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(BaseException, match="Missing key"):  # (DCP raises a CheckpointException, a BaseException)
        dcp.load({"optim": target_sd}, checkpoint_id=str(tmp_path), no_dist=True)
    for key, value in target.state_dict()["state"][0].items():
        assert torch.equal(value, before["state"][0][key]), key


def _corruptions():
    def edit(key, fn):
        return lambda s: s.__setitem__(key, fn(s[key]))

    return {
        "m as uint8": edit("exp_avg_codes", lambda t: t.to(torch.uint8)),
        "v as int8": edit("exp_avg_sq_codes", lambda t: t.to(torch.int8)),
        "codes of another shape": edit("exp_avg_codes", lambda t: t.reshape(-1)),
        "the code -128": edit("exp_avg_codes", lambda t: torch.full_like(t, -128)),
        "a scale too few": edit("exp_avg_absmax", lambda t: t[:-1].clone()),
        "float64 scales": edit("exp_avg_sq_absmax", lambda t: t.double()),
        "a negative scale": edit("exp_avg_absmax", lambda t: -t),
        "a NaN scale": edit("exp_avg_sq_absmax", lambda t: torch.full_like(t, float("nan"))),
        "scales without codes": lambda s: (
            s.__setitem__("exp_avg_codes", s["exp_avg_codes"].float()) or s.pop("exp_avg_sq_absmax")
        ),
        "codes under both names": lambda s: s.__setitem__("exp_avg", s["exp_avg_codes"].clone()),
        "a scale missing": lambda s: s.pop("exp_avg_sq_absmax"),
    }


@pytest.mark.parametrize("corruption", list(_corruptions()))
@pytest.mark.parametrize("target", ["AdamNX8bit", "AdamNX"])
def test_malformed_8bit_state_is_refused_and_the_optimizer_is_untouched(corruption, target):
    opt, params = _trained("for-loop")
    saved = copy.deepcopy(opt.state_dict())
    _corruptions()[corruption](saved["state"][0])
    victim = AdamNX8bit(params, lr=1e-2) if target == "AdamNX8bit" else AdamNX(params, lr=1e-2)
    _steps(victim, params, 1, seed=5)
    before = copy.deepcopy(victim.state_dict())
    with pytest.raises(ValueError, match="state of parameter 0"):
        victim.load_state_dict(saved)
    after = victim.state_dict()
    for pid, p_state in before["state"].items():
        for key, value in p_state.items():
            assert torch.equal(after["state"][pid][key], value), (pid, key)


def test_state_replaced_by_hand_is_refused_before_anything_steps():
    opt, params = _trained("for-loop")
    before = [p.detach().clone() for p in params]
    opt.state[params[0]]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="one scale per block"):
        _steps(opt, params, 1, seed=9)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_pickle_and_deepcopy_keep_min_8bit_size():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = AdamNX8bit([p], min_8bit_size=64)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.min_8bit_size == 64


# --------------------------------------------------------------------------- the guard, GradScaler, compile, release


@pytest.mark.parametrize("impl", QUANTIZED)
def test_the_guard_starts_late_rows_at_their_own_t_equals_1(impl):
    """An embedding whose rows first get gradients at different steps: each coordinate's count is what float32
    AdamNX's is, and a row that starts late gets m = g (within one code), not (1 − β1_t)·g."""
    torch.manual_seed(0)
    rows = 64
    emb = torch.nn.Parameter(torch.randn(rows, 128))
    ref = torch.nn.Parameter(emb.detach().clone())
    opt = make(impl, [emb], lr=1e-2, per_coordinate_steps=True)
    plain = AdamNX([ref], lr=1e-2, per_coordinate_steps=True, foreach=False)
    g = torch.Generator().manual_seed(1)
    for t in range(12):
        grad = torch.randn(rows, 128, generator=g)
        grad[8 * (t + 1) :] = 0  # rows start eight at a time: rows 56–63 at t = 8
        emb.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        plain.step()
        state = opt.state[emb]
        m = dequantize(state["exp_avg_codes"], state["exp_avg_absmax"])
        largest = state["exp_avg_absmax"].repeat_interleave(BLOCK).view(rows, 128)
        if t == 7:
            assert ((m[56:] - grad[56:]).abs() <= GAP[True] * largest[56:]).all()
    assert torch.equal(opt.coord_steps(emb), plain.coord_steps(ref))
    assert ((m - plain.state[ref]["exp_avg"]).abs() <= 0.1 * largest).all()  # a few codes of noise


@pytest.mark.parametrize("impl", implementations(amp=True, quantized_state=True))
def test_grad_scaler_unscales_in_the_step_and_skips_inf_steps(impl):
    torch.manual_seed(0)
    scaled, plain = torch.nn.Linear(128, 64), torch.nn.Linear(128, 64)
    plain.load_state_dict(scaled.state_dict())
    opt, ref = make(impl, scaled.parameters(), lr=1e-2), make(impl, plain.parameters(), lr=1e-2)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x = torch.randn(16, 128)
    for step in range(6):
        opt.zero_grad()
        ref.zero_grad()
        scaler.scale(scaled(x).pow(2).mean()).backward()
        plain(x).pow(2).mean().backward()
        if step == 3:
            scaled.weight.grad[0, 0] = float("inf")
            before = copy.deepcopy(opt.state_dict())
            scaler.step(opt)
            scaler.update()
            for key, value in opt.state_dict()["state"][0].items():
                assert torch.equal(value, before["state"][0][key]), key
            continue
        torch.manual_seed(step)
        scaler.step(opt)
        scaler.update()
        torch.manual_seed(step)
        ref.step()
    # a power-of-two scale unscales exactly: the same bits as the unscaled run with the same random draws
    assert torch.allclose(scaled.weight, plain.weight, rtol=0, atol=1e-6)
    assert opt.state[scaled.weight]["step"].item() == 5


def test_compiled_step_trains_like_the_eager_step():
    _, _, eager_error = _regression(lambda ps: AdamNX8bit(ps, lr=1e-2, foreach=False), steps=40)
    torch._dynamo.reset()

    def compiled_factory(ps):
        opt = AdamNX8bit(ps, lr=1e-2, foreach=False)
        opt.step = torch.compile(opt.step)
        return opt

    compiled, opt, compiled_error = _regression(compiled_factory, steps=40)
    assert opt.state[compiled.weight]["exp_avg_codes"].dtype == torch.int8
    assert compiled_error == pytest.approx(eager_error, rel=0.05)


@pytest.mark.parametrize("impl", ["for-loop", "fused"])
def test_gradient_release_with_8bit_state(impl):
    """Released gradients with 8-bit moments: the same training as the ordinary loop (within what the random
    rounding varies), and the released optimizer's state dict loads into an ordinary one."""
    _, _, plain_error = _regression(lambda ps: make(impl, ps, lr=1e-2), steps=100)

    def released(ps):
        opt = make(impl, ps, lr=1e-2)
        adamnx.release_gradients(opt)
        return opt

    model, opt, released_error = _regression(released, steps=100)
    assert model.weight.grad is None
    assert released_error == pytest.approx(plain_error, rel=0.05)
    other = AdamNX8bit(model.parameters(), lr=1e-2)
    other.load_state_dict(without_options(opt.state_dict()))
    assert torch.equal(other.state[model.weight]["exp_avg_codes"], opt.state[model.weight]["exp_avg_codes"])


def test_the_public_name():
    assert adamnx.AdamNX8bit is AdamNX8bit and "AdamNX8bit" in adamnx.__all__


# --------------------------------------------------------------------------- found by review


def _bias_run(opt_factory, steps=5, compiled=False):
    """A 1-D param of 5,000 elements (19 whole blocks and a last block of 136) trained a few steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 5000)
    start = model.bias.detach().clone()
    opt = opt_factory(model.parameters())
    step = torch.compile(opt.step) if compiled else opt.step
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 64, generator=g)).pow(2).mean().backward()
        step()
    return model.bias.detach(), start, opt.state[model.bias]


def test_a_compiled_step_updates_the_last_partial_block_too():
    """torch.compile(opt.step) of the default path, on a param whose last block is partial: every element moves and
    the trajectory is the eager one's (TorchInductor miscompiled a padded last block on the CPU: its elements never
    moved)."""
    torch._dynamo.reset()
    eager, start, _ = _bias_run(lambda ps: AdamNX8bit(ps, lr=1e-2, weight_decay=0.0))
    compiled, _, state = _bias_run(lambda ps: AdamNX8bit(ps, lr=1e-2, weight_decay=0.0), compiled=True)
    assert state["exp_avg_codes"].dtype == torch.int8
    assert (compiled != start).all() and (eager != start).all()
    assert ((compiled - start) - (eager - start)).abs().max() <= 0.1 * (eager - start).abs().max()


def test_the_accelerator_kernel_updates_the_last_partial_block_too():
    loop, start, _ = _bias_run(lambda ps: make("for-loop", ps, lr=1e-2, weight_decay=0.0))
    inductor, _, state = _bias_run(lambda ps: make("fused-inductor", ps, lr=1e-2, weight_decay=0.0))
    assert (inductor != start).all() and state["exp_avg_sq_codes"][-136:].ne(0).all()
    assert ((inductor - start) - (loop - start)).abs().max() <= 0.1 * (loop - start).abs().max()


@pytest.mark.parametrize("impl", QUANTIZED)
@pytest.mark.parametrize("ratio", [1e-2, 1e-4, 1e-6])
def test_a_tiny_gradient_beside_a_large_one_in_its_block_gets_no_huge_update(impl, ratio):
    """Each block: one coordinate with gradients of scale 1, the rest `ratio` of that. float32 AdamNX moves each by
    at most ~1.02 lr; 8-bit moments once let a tiny v round to 0 while m did not (1e-4: 170 lr, 1e-6: 14,000 lr).
    Now a non-zero v is never 0 and m's codes reach further down than √v's: at most 8 lr, and above 3 lr only where
    v sits on its lowest, coarsest codes (ratio 1e-4: ~0.2% of the updates, up to ~6 lr)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.full((16, BLOCK), ratio)
    scale[:, 0] = 1.0
    p = torch.nn.Parameter(torch.zeros(16 * BLOCK))
    opt = make(impl, [p], lr=1.0, weight_decay=0.0)
    steps, largest, above_3 = 200, 0.0, 0
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = (torch.randn(16, BLOCK, generator=g) * scale).view(-1)
        opt.step()
        moved = (p.detach() - before).view(16, BLOCK)[:, 1:].abs()
        largest, above_3 = max(largest, moved.max().item()), above_3 + int((moved > 3).sum())
    assert largest <= 8.0
    assert above_3 <= 0.005 * steps * 16 * (BLOCK - 1)


def test_blocks_of_subnormal_values_are_stored_as_zeros_on_both_paths():
    x = torch.full((300,), 1e-39)
    x[-44:] = 1.0  # the last block is ordinary
    for signed in (True, False):
        codes, scales = quantize(x, signed)
        values = dequantize(codes, scales)
        assert torch.isfinite(values).all() and (values[:256] == 0).all() and torch.equal(values[256:], x[256:])
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = AdamNX8bit([p], fused=True, lr=1e-3)
    p.grad = torch.full((4096,), 1e-20)  # v = 1e-40: subnormal
    opt.step()
    assert torch.isfinite(p).all() and p.abs().max() <= 1e-3 * 1.01


@pytest.mark.parametrize("signed", [True, False], ids=["m", "v"])
def test_the_kernels_vectorised_encoder_gives_the_scalar_ones_codes_bit_for_bit(signed):
    """The fused CPU kernel's encoders, the vectorised one (where built with AVX2: no exact roots, see
    encode_stochastic8) and the scalar one, with the same random bits, where a low code is decided: 0, subnormals, 1,
    the floats around every code's value (the exact roots' steps lie within 7 ulps of them), random values; each with
    the noise at both ends and at random. Both agree with quantize away from the steps: torch's float32 sqrt is not
    always correctly rounded (torch 2.13 on AVX2: one ulp off now and then), which moves quantize's steps by an ulp or
    two; the kernel's roots are IEEE's."""
    from adamnx.backends import _cpu_extension

    ops = _cpu_extension.load()
    levels = 127 if signed else 255
    value = torch.arange(1, levels + 1, dtype=torch.float32) * (1.0 / levels)  # the kernel's code_value, step by step
    value = value * value
    value = value * value
    around = (value.view(torch.int32)[:, None] + torch.arange(-40, 41, dtype=torch.int32)).flatten().view(torch.float32)
    special = torch.tensor([0.0, 1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38, 1e-30, 0.99999994, 1.0])
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(20_000, generator=g)
    r = torch.cat([special, around.clamp(0.0, 1.0), spread, spread**4, spread**16])
    r = torch.cat([r, r, r])
    noise = torch.randint(0, 1 << 16, r.shape, dtype=torch.int32, generator=g)
    noise[: len(r) // 3] = 0
    noise[len(r) // 3 : 2 * len(r) // 3] = (1 << 16) - 1
    x = r * (torch.randint(0, 2, r.shape, generator=g) * 2 - 1) if signed else r

    def blocks(t: torch.Tensor, first: float) -> torch.Tensor:  # each block starts with `first`: its scale is 1
        rows = torch.nn.functional.pad(t, (0, -len(t) % (BLOCK - 1))).view(-1, BLOCK - 1)
        return torch.cat([torch.full((len(rows), 1), first, dtype=t.dtype), rows], 1).flatten()

    x, noise = blocks(x, 1.0), blocks(noise, 0)
    scalar, vectorised = torch.empty_like(x), torch.empty_like(x)
    ops.encode_8bit_(x, noise, signed, False, scalar)
    ops.encode_8bit_(x, noise, signed, True, vectorised)
    assert torch.equal(vectorised.view(torch.int32), scalar.view(torch.int32))  # bitwise: -0.0 too
    expected, scales = quantize(x, signed, noise=noise)
    assert (scales == 1.0).all()
    bits = x.abs().view(torch.int32)
    near_a_step = ((bits[:, None] - value.view(torch.int32)).abs() <= 64).any(1)
    assert torch.equal(scalar[~near_a_step], expected[~near_a_step].to(torch.float32))
    assert (scalar[near_a_step] - expected[near_a_step]).abs().max() <= 1


def test_a_param_cast_after_its_state_exists_is_refused_until_the_state_is_converted():
    opt, params = _trained("for-loop")
    params[0].data = params[0].data.double()
    params[0].grad = torch.randn(params[0].shape, dtype=torch.float64)
    params[1].grad = torch.randn(7)
    with pytest.raises(RuntimeError, match="keeps no 8-bit moments"):
        opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float64 and "exp_avg_absmax" not in opt.state[params[0]]
    opt.step()


def test_codes_loaded_with_other_strides_are_kept_contiguous():
    opt, params = _trained("fused")
    saved = copy.deepcopy(opt.state_dict())
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        codes = saved["state"][0][key]
        saved["state"][0][key] = codes.t().contiguous().t()  # same values, column-major
    other = make("fused", [torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    other.load_state_dict(saved)
    state = next(iter(other.state.values()))
    assert state["exp_avg_codes"].is_contiguous() and torch.equal(
        state["exp_avg_codes"], opt.state[params[0]]["exp_avg_codes"]
    )


# --------------------------------------------------------------------------- CUDA (skipped without it)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"fused": True}, {"foreach": True}, {"capturable": True}])
def test_cuda_8bit_tracks_float32_and_steps_a_partial_last_block(options):
    """On CUDA: fused=True compiles update_8bit with Triton; v's mean tracks float32 state, and a 1-D param with a
    partial last block moves everywhere like the float32 run."""
    grads = [g.cuda() for g in _unit_gaussian_grads(600, change_at=300, n=5000)]
    means = {}
    for name, factory in (
        ("exact", lambda ps: AdamNX(ps, foreach=False)),
        ("8bit", lambda ps: AdamNX8bit(ps, **options)),
    ):
        p = torch.nn.Parameter(torch.zeros(5000, device="cuda"))
        opt = factory([p])
        means[name] = []
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
            means[name].append(_values(opt.state[p])[1].mean().item())
    assert opt.state[p]["exp_avg_codes"].dtype == torch.int8
    for t in (299, 599):
        assert means["8bit"][t] == pytest.approx(means["exact"][t], rel=0.03), t
    assert (p.detach() != 0).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_a_compiled_step_of_a_channels_last_model_with_a_partial_last_block(foreach):
    """torch.compile(opt.step) on a channels_last conv and a 5,000-element bias: it compiles and trains (the
    update's working copies kept the param's strides, tracing stopped there and inductor failed to lower the
    rest, found by review)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 5000)
    ).to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 8, 8).to(memory_format=torch.channels_last)
    start = [p.detach().clone() for p in model.parameters()]
    opt = AdamNX8bit(model.parameters(), lr=1e-3, foreach=foreach)
    step = torch.compile(opt.step)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        step()
    assert opt.state[model[0].weight]["exp_avg_codes"].dtype == torch.int8 and model[0].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    for p, p0 in zip(model.parameters(), start):
        assert torch.isfinite(p).all() and (p != p0).float().mean() > 0.99


@pytest.mark.parametrize("impl", ["for-loop", "fused"])
def test_an_overflow_of_v_makes_its_block_of_v_nan_and_leaves_m_alone_on_both_paths(impl):
    """A gradient of 1e20 (g² overflows float32): v's block gets a NaN scale on every path (the kernel and the torch
    ops follow one rule), m's block stays finite. (float32 state confines it to the element: documented.)"""
    p = torch.nn.Parameter(torch.zeros(2 * BLOCK))
    opt = make(impl, [p], lr=1e-3, min_8bit_size=BLOCK)
    grad = torch.ones(2 * BLOCK)
    grad[3] = 1e20
    p.grad = grad
    opt.step()
    state = opt.state[p]
    assert state["exp_avg_sq_absmax"][0].isnan() and state["exp_avg_sq_absmax"][1] == 1.0
    assert torch.isfinite(state["exp_avg_absmax"]).all()
    assert (state["exp_avg_sq_codes"][:BLOCK] == 0).all() and (state["exp_avg_codes"][:BLOCK] != -128).all()


def test_a_flattened_distributed_state_dict_round_trips():
    """torch.distributed.checkpoint's flatten_optimizer_state_dict=True (torchtitan's) rebuilds each param's state from
    the live state's key names: the state and its state dicts name the codes alike (exp_avg_codes), or the codes
    came back as {} and the load was refused."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 80)
    opt = AdamNX8bit(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(16, 64)).square().mean().backward()
    opt.step()
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    assert "state.weight.exp_avg_codes" in saved
    other_model = torch.nn.Linear(64, 80)
    other = AdamNX8bit(other_model.parameters(), lr=1e-2, fused=True)
    set_optimizer_state_dict(other_model, other, saved, options=options)
    for key, value in opt.state[model.weight].items():
        assert torch.equal(other.state[other_model.weight][key], value), key


def test_the_harness_reads_8bit_second_moments_as_values():
    """adamnx bench's ‖Δv‖/‖v‖ diagnostic: AdamNX8bit's v is the values its codes hold (it read the uint8 codes, then
    skipped quantized params)."""
    from adamnx.bench.optimizers import second_moment_tensors

    big, small = torch.nn.Parameter(torch.zeros(4 * BLOCK)), torch.nn.Parameter(torch.zeros(3))
    opt = AdamNX8bit([big, small], lr=1e-2, min_8bit_size=BLOCK)
    _steps(opt, [big, small], 2, seed=4)
    moments = second_moment_tensors(opt)
    assert torch.equal(moments[0], quantized.moments_of(opt.state[big])[1])
    assert moments[1] is opt.state[small]["exp_avg_sq"]
