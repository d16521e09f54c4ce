"""per_coordinate_steps (the late-activation guard) on every implementation: the paper's trajectory per coordinate,
the implementations equal to each other, the lags the state keeps (their layouts, written once, each layout giving the
bits of lags per element), GradScaler, checkpoints and edits, saturation and the window, and the coefficient table."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import adamnx._table as table_module
from adamnx import AdamNX, guard
from adamnx._table import coordinate_table, host_coefficients
from adamnx.guard import ELEMENT, LAYOUTS, MAX_COUNT, NOT_STARTED, ROW, TENSOR, WINDOW
from adamnx.schedule import coefficients
from helpers import (
    IMPLEMENTATIONS,
    implementations,
    initial_params,
    late_starting_gradients,
    per_coordinate_reference,
    rel_err,
    run_torch,
    without_options,
)

IMPLS = list(IMPLEMENTATIONS)
OTHERS = [impl for impl in IMPLS if impl != "for-loop"]  # held to the for-loop
# Those that keep lags in every layout (capturable keeps them per element, on the device; so do rows that execute
# only that layout).
EVERY_LAYOUT = [i for i in implementations(capturable=False) if IMPLEMENTATIONS[i].backend.guard_layouts == {*LAYOUTS}]
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "per_coordinate_steps": True}


def _counts(opt, p) -> torch.Tensor:
    return opt.coord_steps(p)


def _step_through(opt, params, grads) -> None:
    """Step ``opt`` once per entry of ``grads`` (one gradient per param)."""
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()


def _run_with_checkpoint(impl, params0, grads, at: int):
    """Run, save a state dict after ``at`` steps, load it into a new optimizer, and finish the run with that one."""
    params, opt = run_torch(params0, grads[:at], impl=impl, **HYPER)
    saved = copy.deepcopy(opt.state_dict())
    resumed = IMPLEMENTATIONS[impl](params, **HYPER)
    resumed.load_state_dict(saved)
    _step_through(resumed, params, grads[at:])
    return params, resumed


def _lags_per_element_only(monkeypatch):
    """Every tensor keeps its lags per element (the finest layout): the bits every layout must give."""
    monkeypatch.setattr(guard, "fresh_lag", lambda p: torch.full_like(p, NOT_STARTED, dtype=torch.int32))
    coarsest = guard.lags_from_counts
    monkeypatch.setattr(
        guard,
        "lags_from_counts",
        lambda count, step, like=None: guard.expand(coarsest(count, step, like), count if like is None else like),
    )


def _assert_bitwise(params, opt, expected, other, keys=("exp_avg", "exp_avg_sq")):
    for p, q in zip(params, expected):
        assert torch.equal(_counts(opt, p), _counts(other, q))
        for key in keys:
            torch.testing.assert_close(opt.state[p][key], other.state[q][key], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- the paper's trajectory, per coordinate


@pytest.fixture(scope="module")
def late_run():
    """1,000 float64 steps in which coordinates start at steps 1 to ~1,100 (some never), and the reference."""
    grads = late_starting_gradients(1_000)
    params0 = initial_params()
    return params0, grads, per_coordinate_reference(params0, grads, 1e-2, (0.9, 0.99), 0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_follows_each_coordinate_from_its_first_gradient(impl, late_run):
    params0, grads, reference = late_run
    params, opt = run_torch(params0, grads, impl=impl, **HYPER)
    for p, (theta, m, v, count) in zip(params, reference):
        counts = _counts(opt, p)
        assert counts.dtype == torch.int32
        np.testing.assert_array_equal(counts.numpy(), count)
        # float64 throughout, the same coefficient function: rounding only (seen: ≤ 1e-14)
        for actual, expected in ((p, theta), (opt.state[p]["exp_avg"], m), (opt.state[p]["exp_avg_sq"], v)):
            assert rel_err(actual, expected) <= 1e-12


@pytest.mark.parametrize("impl", OTHERS)
def test_float32_implementations_equal_the_for_loop(impl):
    grads = late_starting_gradients(1_000, dtype=torch.float32, seed=2)
    params0 = initial_params(dtype=torch.float32)
    expected, loop = run_torch(params0, grads, impl="for-loop", **HYPER)
    params, opt = run_torch(params0, grads, impl=impl, **HYPER)
    for p, q in zip(params, expected):
        assert torch.equal(_counts(opt, p), _counts(loop, q))
        if impl == "foreach":  # the same torch ops in the same order
            assert torch.equal(p, q)
        else:
            # fused kernels contract a·b + c into FMAs and capturable evaluates the coefficients on the device:
            # one rounding per step apart, which 1,000 steps of a contracting map keep at a few ulps (seen: 3e-7)
            assert rel_err(p, q.detach().double().numpy()) <= 1e-5


@pytest.mark.parametrize("impl", OTHERS)
def test_large_tensors_with_rows_and_elements_starting_late_equal_the_for_loop(impl):
    """Tensors large enough for the fused kernel's blocks: rows that start together (an embedding), elements that
    start one by one, rows that never start, and a thread split (the CPU kernel splits at 16,384 elements)."""
    g = torch.Generator().manual_seed(8)
    shapes = [(300, 64), (5, 4099)]
    starts = [
        torch.randint(1, 120, (300, 1), generator=g).repeat(1, 64),
        torch.randint(1, 150, (5, 4099), generator=g),
    ]
    starts[0][::7] = 10**6  # never
    params0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=g, dtype=torch.float64) * (start <= t) for s, start in zip(shapes, starts)]
        for t in range(1, 101)
    ]
    expected, loop = run_torch(params0, grads, impl="for-loop", **HYPER)
    params, opt = run_torch(params0, grads, impl=impl, **HYPER)
    for p, q in zip(params, expected):
        assert torch.equal(_counts(opt, p), _counts(loop, q))
        assert rel_err(p, q.detach().numpy()) <= 1e-12  # float64: rounding only


@pytest.mark.parametrize("impl", IMPLS)
def test_coordinates_with_a_history_get_the_tensors_coefficients_bitwise(impl):
    """A count equal to the tensor's step reads the row built from the same evaluation as the tensor's own
    coefficients: with no zero gradient, the guard changes nothing, to the bit."""
    grads = late_starting_gradients(300, seed=4)
    grads = [[g + (g == 0) for g in step] for step in grads]  # no exact zeros: every coordinate starts at t = 1
    params0 = initial_params()
    plain, _ = run_torch(params0, grads, impl=impl, lr=1e-2)
    guarded, _ = run_torch(params0, grads, impl=impl, lr=1e-2, per_coordinate_steps=True)
    for p, q in zip(plain, guarded):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", OTHERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_float32_state(impl, dtype):
    grads = late_starting_gradients(60, dtype=dtype, seed=5)
    params0 = initial_params(dtype=dtype)
    kw = {**HYPER, "state_dtype": torch.float32}
    expected, loop = run_torch(params0, grads, impl="for-loop", **kw)
    params, opt = run_torch(params0, grads, impl=impl, **kw)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one rounding of the param, relative
    for p, q in zip(params, expected):
        assert torch.equal(_counts(opt, p), _counts(loop, q))
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q.detach().float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_stochastic_rounding_with_per_coordinate_steps(impl):
    """A bf16 step rounds the float32 result up or down: a float32 twin started from the same state computes that
    result, so each param lands within one bf16 ulp of it, and the counts advance alike."""
    grads = late_starting_gradients(20, dtype=torch.bfloat16, seed=6)
    kw = {**HYPER, "state_dtype": torch.float32, "stochastic_rounding": True}
    params, opt = run_torch(initial_params(dtype=torch.bfloat16), grads[:19], impl=impl, **kw)
    twin = [p.detach().float().requires_grad_(True) for p in params]  # exact: bf16 ⊂ float32
    twin_opt = AdamNX(twin, foreach=False, **HYPER)
    twin_opt.load_state_dict(without_options(copy.deepcopy(opt.state_dict())))
    for group, (ps, o) in ((grads[19], (params, opt)), (grads[19], (twin, twin_opt))):
        for p, g in zip(ps, group):
            p.grad = g.to(p.dtype)
        o.step()
    for p, x in zip(params, twin):
        assert torch.equal(_counts(opt, p), _counts(twin_opt, x))
        x = x.detach()
        ulp = torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)
        assert ((p.detach().float() - x).abs() <= ulp * (1 + 2.0**-10)).all()


@pytest.mark.parametrize("impl", implementations(amp=True))
def test_grad_scaler_overflow_skips_the_counts_too(impl):
    """The implementations that take GradScaler's found_inf honour it with the guard on: a skipped step changes
    nothing."""
    torch.manual_seed(0)
    model, plain = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    plain.load_state_dict(model.state_dict())
    opt = IMPLEMENTATIONS[impl](model.parameters(), lr=1e-2, per_coordinate_steps=True)
    loop = AdamNX(plain.parameters(), lr=1e-2, foreach=False, per_coordinate_steps=True)
    assert opt._step_supports_amp_scaling  # the scaler hands the step its grad_scale and found_inf
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    x[:, 4] = 0  # weight column 4 never gets a gradient: its counts stay 0
    for step in range(6):
        opt.zero_grad()
        loop.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step == 3:  # an overflow: the whole step is skipped, counts included
            model.weight.grad[0, 0] = float("inf")
            before = copy.deepcopy(opt.state_dict()["state"])
            scaler.step(opt)
            scaler.update()
            for pid, state in before.items():
                for key, value in state.items():
                    assert torch.equal(opt.state_dict()["state"][pid][key], value), key
            continue
        scaler.step(opt)
        scaler.update()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        loop.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel_err(p, q.detach().double().numpy()) <= 1e-6
    counts = _counts(opt, model.weight)
    assert torch.equal(counts, _counts(loop, plain.weight))
    assert counts[:, 4].eq(0).all() and counts[:, :4].eq(5).all()


@pytest.mark.parametrize("impl", implementations(amp=True))
def test_a_first_step_skipped_by_found_inf_starts_nothing(impl, monkeypatch):
    """GradScaler's usual first step (found_inf = 1 at step 0): nothing starts; coordinates whose first gradient is
    zero keep waiting, as with lags per element."""

    def run():
        g = torch.Generator().manual_seed(0)
        p = torch.randn(64, 64, generator=g).requires_grad_()
        opt = IMPLEMENTATIONS[impl]([p], **HYPER)
        opt.grad_scale = torch.ones(())
        for t in range(6):
            gr = torch.randn(64, 64, generator=g)
            if t < 4:
                gr[0, :5] = 0.0  # five coordinates start at step 4
            opt.found_inf = torch.ones(()) if t == 0 else torch.zeros(())
            p.grad = gr
            opt.step()
        return [p], opt

    params, opt = run()
    assert _counts(opt, params[0])[0, :5].tolist() == [2] * 5 and _counts(opt, params[0])[1, 0] == 5
    with monkeypatch.context() as patch:
        _lags_per_element_only(patch)
        expected, other = run()
    _assert_bitwise(params, opt, expected, other)


@pytest.mark.parametrize("impl", implementations(amp=True))
def test_a_scaled_gradient_that_is_zero_only_in_fp16_starts_alike_in_every_layout(impl, monkeypatch):
    """GradScaler's unscale makes 1e-3 / 65536 = 1.5e-8: 0 in fp16, not in the float32 the update is computed in. The
    update starts the coordinate; the guard's record of it agrees, in every layout."""

    def run():
        p = torch.nn.Parameter(torch.ones(16, 16, dtype=torch.float16))
        opt = IMPLEMENTATIONS[impl]([p], lr=1e-2, per_coordinate_steps=True, state_dtype=torch.float32)
        opt.grad_scale, opt.found_inf = torch.tensor(65536.0), torch.tensor(0.0)
        for g in (1e-3, 1e3):
            p.grad = torch.full((16, 16), g, dtype=torch.float16)
            opt.step()
        return [p], opt

    params, opt = run()
    assert _counts(opt, params[0]).eq(2).all()
    with monkeypatch.context() as patch:
        _lags_per_element_only(patch)
        expected, other = run()
    _assert_bitwise(params, opt, expected, other)


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpoint_round_trip_continues_bitwise(impl):
    grads = late_starting_gradients(80, dtype=torch.float32, seed=7)
    params0 = initial_params(dtype=torch.float32)
    straight, straight_opt = run_torch(params0, grads, impl=impl, **HYPER)
    resumed, opt = _run_with_checkpoint(impl, params0, grads, at=40)
    ours, theirs = opt.state_dict()["state"], straight_opt.state_dict()["state"]
    for i, (p, q) in enumerate(zip(resumed, straight)):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq", "coord_step"):
            a, b = ours[i][key], theirs[i][key]
            assert a.dtype == b.dtype and torch.equal(a, b), key


class _Module(torch.nn.Module):
    """Params under names, which torch.distributed.checkpoint's state dicts need."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def _dcp_restart(opt_class, params0, grads, at: int, flatten: bool, tmp_path, **kwargs):
    """A run saved after ``at`` steps through torch.distributed.checkpoint as a training script does it (a fresh
    optimizer's state dict as the template: its state created by torch's lr = 0 "fake" step), then finished."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    module = _Module([torch.nn.Parameter(p.clone()) for p in params0])
    opt = opt_class(module.params, **HYPER, **kwargs)
    _step_through(opt, list(module.params), grads[:at])
    dcp.save({"optim": get_optimizer_state_dict(module, opt, options=options)}, checkpoint_id=tmp_path)
    resumed_module = _Module([torch.nn.Parameter(p.detach().clone()) for p in module.params])
    resumed = opt_class(resumed_module.params, **HYPER, **kwargs)
    template = {"optim": get_optimizer_state_dict(resumed_module, resumed, options=options)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(resumed_module, resumed, template["optim"], options=options)
    params = list(resumed_module.params)
    _step_through(resumed, params, grads[at:])
    return params, resumed


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP in one process without a process group says so
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("eight_bit", [False, True], ids=["AdamNX", "AdamNX8bit"])
def test_a_distributed_checkpoint_restart_keeps_every_coordinates_count(eight_bit, flatten, tmp_path):
    """DCP asks a checkpoint only for the entries the live state (its template) names; the fake step created no
    counts, so a restart silently dropped them and counted late coordinates from the tensor's first step."""
    from adamnx import AdamNX8bit

    opt_class, kwargs = (AdamNX8bit, {"min_8bit_size": 16}) if eight_bit else (AdamNX, {})
    shapes = [(5, 3), (4, 64), ()]
    grads = late_starting_gradients(80, shapes=shapes, dtype=torch.float32, seed=7)
    params0 = initial_params(shapes, dtype=torch.float32)
    torch.manual_seed(0)  # 8-bit rounding draws from generators seeded by the step: the restart rounds alike
    straight, straight_opt = run_torch(params0, grads, impl=None, **HYPER) if not eight_bit else (None, None)
    if eight_bit:
        straight = [p.clone().requires_grad_(True) for p in params0]
        straight_opt = AdamNX8bit(straight, **HYPER, **kwargs)
        _step_through(straight_opt, straight, grads)
    resumed, opt = _dcp_restart(opt_class, params0, grads, at=40, flatten=flatten, tmp_path=tmp_path, **kwargs)
    for p, q in zip(resumed, straight):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.coord_steps(p), straight_opt.coord_steps(q))
    counts = opt.coord_steps(resumed[1])
    assert ((counts > 0) & (counts < 40)).any() and (counts > 40).any()  # started after the restart, and before


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_distributed_checkpoint_without_counts_is_refused_by_a_guarded_optimizer_untouched(tmp_path):
    """Saved without per_coordinate_steps: DCP refuses (Missing key ... coord_step) before it writes a thing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    grads = late_starting_gradients(6, dtype=torch.float32, seed=7)
    module = _Module([torch.nn.Parameter(p) for p in initial_params(dtype=torch.float32)])
    opt = AdamNX(module.params, **{**HYPER, "per_coordinate_steps": False})
    _step_through(opt, list(module.params), grads)
    dcp.save({"optim": get_optimizer_state_dict(module, opt)}, checkpoint_id=tmp_path)
    fresh = _Module([torch.nn.Parameter(p.detach().clone()) for p in module.params])  # no .grad: DCP's fake step runs
    guarded = AdamNX(fresh.params, **HYPER)
    template = {"optim": get_optimizer_state_dict(fresh, guarded)}
    assert all("coord_step" in state for state in template["optim"]["state"].values())
    before = copy.deepcopy(guarded.state_dict())
    with pytest.raises(CheckpointException, match="coord_step"):
        dcp.load(template, checkpoint_id=tmp_path)
    after = guarded.state_dict()
    for pid, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][pid][key], value), key


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("route", ["full_state_dict", "partial_load"])
def test_a_checkpoint_without_counts_read_through_a_template_counts_from_the_tensors_step(route, tmp_path):
    """A checkpoint saved without per_coordinate_steps, loaded into a guarded optimizer through a template that holds
    the fake step's counts (0) which nothing overwrites: set_optimizer_state_dict(full_state_dict=True), or DCP's
    allow_partial_load. A count of 0 where v is not 0 counts from the tensor's step, as load_state_dict of the same
    checkpoint gives (every coordinate restarted at t = 1 before)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    grads = late_starting_gradients(20, dtype=torch.float32, seed=4)
    params0 = initial_params(dtype=torch.float32)
    module = _Module([torch.nn.Parameter(p.clone()) for p in params0])
    unguarded = AdamNX(module.params, **{**HYPER, "per_coordinate_steps": False})
    _step_through(unguarded, list(module.params), grads[:10])

    def resumed(load):
        copy_ = _Module([torch.nn.Parameter(p.detach().clone()) for p in module.params])
        opt = AdamNX(copy_.params, **HYPER)
        load(copy_, opt)
        params = list(copy_.params)
        _step_through(opt, params, grads[10:])
        return params, opt

    expected, expected_opt = resumed(lambda m, o: o.load_state_dict(unguarded.state_dict()))
    if route == "full_state_dict":
        full = StateDictOptions(full_state_dict=True)
        saved = get_optimizer_state_dict(module, unguarded, options=full)
        got, opt = resumed(lambda m, o: set_optimizer_state_dict(m, o, saved, options=full))
    else:
        dcp.save({"optim": get_optimizer_state_dict(module, unguarded)}, checkpoint_id=tmp_path)

        def partial(m, o):
            template = {"optim": get_optimizer_state_dict(m, o)}
            dcp.load(template, checkpoint_id=tmp_path, planner=DefaultLoadPlanner(allow_partial_load=True))
            set_optimizer_state_dict(m, o, template["optim"])

        got, opt = resumed(partial)
    for p, q in zip(got, expected):
        assert torch.equal(p, q) and torch.equal(opt.coord_steps(p), expected_opt.coord_steps(q))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_guarded_param_not_stepped_since_the_guard_was_switched_on_saves_counts(tmp_path):
    """Switched on by hand after a run without it (the documented route), a param that got no gradient since holds
    no counts: state_dict() gives it counts from its history, or a DCP restart (whose template asks for them) would
    be refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    grads = late_starting_gradients(6, dtype=torch.float32, seed=5)
    module = _Module([torch.nn.Parameter(p) for p in initial_params(dtype=torch.float32)])
    opt = AdamNX(module.params, **{**HYPER, "per_coordinate_steps": False})
    _step_through(opt, list(module.params), grads[:3])
    for group in opt.param_groups:
        group["per_coordinate_steps"] = True
    for step in grads[3:]:  # only the first param gets gradients
        for i, (p, g) in enumerate(zip(module.params, step)):
            p.grad = g.clone() if i == 0 else None
        opt.step()
    assert all("coord_step" in state for state in opt.state_dict()["state"].values())
    dcp.save({"optim": get_optimizer_state_dict(module, opt)}, checkpoint_id=tmp_path)
    fresh = _Module([torch.nn.Parameter(p.detach().clone()) for p in module.params])
    resumed = AdamNX(fresh.params, **HYPER)
    template = {"optim": get_optimizer_state_dict(fresh, resumed)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(fresh, resumed, template["optim"])
    for p, q in zip(fresh.params, module.params):
        assert torch.equal(resumed.coord_steps(p), opt.coord_steps(q))


def test_the_guard_switched_off_after_the_fake_step_keeps_no_stale_counts():
    """The fake step's counts (0) are dropped at the first real step when the guard is off by then: switched on again
    later, each coordinate with a history counts from the tensor's step (they stayed 0: every coordinate restarted)."""

    def run(fake_step):
        params = [p.clone().requires_grad_(True) for p in initial_params(dtype=torch.float32)]
        opt = AdamNX(params, **HYPER)
        if fake_step:
            opt.param_groups[0]["lr"] = 0.0
            _step_through(opt, params, [[torch.zeros_like(p) for p in params]])
            opt.param_groups[0]["lr"] = HYPER["lr"]
        opt.param_groups[0]["per_coordinate_steps"] = False
        grads = late_starting_gradients(20, dtype=torch.float32, seed=6)
        _step_through(opt, params, grads[:10])
        assert all("coord_step" not in state for state in opt.state_dict()["state"].values())
        opt.param_groups[0]["per_coordinate_steps"] = True
        _step_through(opt, params, grads[10:])
        return params, opt

    (a, opt_a), (b, opt_b) = run(True), run(False)
    for p, q in zip(a, b):
        assert torch.equal(p, q) and torch.equal(opt_a.coord_steps(p), opt_b.coord_steps(q))


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_the_guard_switched_off_and_on_again_reads_alike_live_and_after_a_load(impl):
    """Switched off, the guard records no starts, so the lags are dropped (kept, they went stale: rows that started
    meanwhile read as not started live, but counted from the tensor's step after a load). Switched on again,
    coordinates with a history count from the tensor's step, live, after a reload and whether or not state_dict()
    was called in a short guarded spell before rows started."""
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(6, 8, generator=g) * (torch.arange(6)[:, None] * 2 <= t) for t in range(14)]  # row r: 2r
    guarded = [not 3 <= t < 9 for t in range(14)]

    def run(reload_at=None, peek_at=None):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(6, 8))
        opt = IMPLEMENTATIONS[impl]([p], **HYPER)
        for t, grad in enumerate(grads):
            if t == peek_at:  # switched on for a moment (no step), state_dict() gives the guarded state counts
                opt.param_groups[0]["per_coordinate_steps"] = True
                opt.state_dict()
            opt.param_groups[0]["per_coordinate_steps"] = guarded[t]
            if t == reload_at:
                saved = copy.deepcopy(opt.state_dict())
                opt = IMPLEMENTATIONS[impl]([p], **HYPER)
                opt.load_state_dict(saved)
                opt.param_groups[0]["per_coordinate_steps"] = guarded[t]
            p.grad = grad.clone()
            opt.step()
        return p, opt

    expected, expected_opt = run()
    for kwargs in ({"reload_at": 9}, {"reload_at": 5}, {"peek_at": 4}):
        p, opt = run(**kwargs)
        assert torch.equal(p, expected), kwargs
        assert torch.equal(opt.coord_steps(p), expected_opt.coord_steps(expected)), kwargs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_flattened_distributed_load_into_a_stepped_guarded_optimizer_is_refused_with_the_reason(tmp_path):
    """DCP's flatten_optimizer_state_dict=True rebuilds a state from the live names: a stepped guarded optimizer keeps
    'coord_lag', so the counts are not read. Refused (as before), now saying why and what to do. (dcp.load has
    already written the step and moments into the live tensors by then, as it does for every optimizer: the template
    of a stepped optimizer is its live state; nothing of ours can keep that from happening.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    grads = late_starting_gradients(8, dtype=torch.float32, seed=2)
    module = _Module([torch.nn.Parameter(p) for p in initial_params(dtype=torch.float32)])
    opt = AdamNX(module.params, **HYPER)
    _step_through(opt, list(module.params), grads[:5])
    dcp.save({"optim": get_optimizer_state_dict(module, opt, options=flat)}, checkpoint_id=tmp_path)
    _step_through(opt, list(module.params), grads[5:])
    template = {"optim": get_optimizer_state_dict(module, opt, options=flat)}
    dcp.load(template, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True into an optimizer that has stepped"):
        set_optimizer_state_dict(module, opt, template["optim"], options=flat)


def test_the_state_creating_fake_step_keeps_zero_counts_then_the_run_is_unchanged():
    """The lr = 0, zero-gradient step creates the state with every count 0 (under the saved name coord_step); the
    first real step turns them into lags, and the run equals one that never saw the fake step."""
    grads = late_starting_gradients(30, dtype=torch.float32, seed=3)
    params0 = initial_params(dtype=torch.float32)
    straight, straight_opt = run_torch(params0, grads, **HYPER)
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = AdamNX(params, **HYPER)
    for group in opt.param_groups:
        group["lr"] = 0.0
    _step_through(opt, params, [[torch.zeros_like(p) for p in params]])
    assert all(torch.equal(opt.coord_steps(p), torch.zeros(_real_shape(p), dtype=torch.int32)) for p in params)
    assert all(int(opt.state[p]["step"]) == 0 for p in params)
    for group in opt.param_groups:
        group["lr"] = HYPER["lr"]
    _step_through(opt, params, grads)
    assert all("coord_step" not in opt.state[p] for p in params)
    for p, q in zip(params, straight):
        assert torch.equal(p, q) and torch.equal(opt.coord_steps(p), straight_opt.coord_steps(q))


def _real_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.view_as_real(p).shape) if p.is_complex() else tuple(p.shape)


# --------------------------------------------------------------------------- the lags: layouts, written once, bits


def _layouts(opt, params):
    return [guard.layout_of(opt.state[p]["coord_lag"], p.shape) for p in params]


def _expected(impl, layouts):
    return layouts if impl in EVERY_LAYOUT else [ELEMENT] * len(layouts)


@pytest.mark.parametrize("impl", IMPLS)
def test_lags_take_the_coarsest_layout_that_holds_them(impl):
    """A dense layer started at step 1 keeps one lag; an embedding whose rows start at different steps, one per row;
    a matrix whose coordinates start one by one, one per coordinate; a tensor that never started, one (not
    started). A checkpoint loads into the same layouts. Capturable keeps lags per element, on the device."""
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 16), (12, 16), (4, 6), (5, 16)]
    row_start = torch.arange(12)[:, None] % 4 + 1
    element_start = torch.arange(24).reshape(4, 6) % 5 + 1
    grads = []
    for t in range(1, 7):
        dense, emb, elements, never = (torch.randn(s, generator=g) for s in shapes)
        grads.append([dense, emb * (row_start <= t), elements * (element_start <= t), never * 0])
    params0 = [torch.randn(s, generator=g) for s in shapes]
    expected = _expected(impl, [TENSOR, ROW, ELEMENT, TENSOR])
    params, opt = run_torch(params0, grads, impl=impl, **HYPER)
    assert _layouts(opt, params) == expected
    params, opt = _run_with_checkpoint(impl, params0, grads, at=5)
    assert _layouts(opt, params) == expected
    assert opt.state[params[3]]["coord_lag"].eq(NOT_STARTED).all()


@pytest.mark.parametrize("impl", EVERY_LAYOUT)
def test_a_step_after_every_coordinate_started_writes_no_lags(impl):
    """Write once: once a tensor's coordinates have started, a step reads its lags and writes none (its version
    counter does not move, on the paths that write with torch ops; its values do not change, on all)."""
    g = torch.Generator().manual_seed(2)
    shapes = [(64, 32), (300, 8), (7, 5)]  # one lag; one per row; one per element
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    opt = IMPLEMENTATIONS[impl](params, **HYPER)
    for t in range(1, 5):
        grads = [torch.randn(s, generator=g) for s in shapes]
        grads[1][t::4] = 0.0 if t < 4 else grads[1][t::4]  # rows start at steps 1 to 4
        grads[2].view(-1)[t::4] = 0.0 if t < 4 else grads[2].view(-1)[t::4]  # coordinates too
        _step_through(opt, params, [grads])
    assert _layouts(opt, params) == [TENSOR, ROW, ELEMENT]
    lags = [opt.state[p]["coord_lag"] for p in params]
    before = [(lag._version, lag.clone()) for lag in lags]
    _step_through(opt, params, [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)])
    for lag, (version, values) in zip(lags, before):
        assert torch.equal(lag, values)
        if impl != "fused":  # the C++ kernel writes memory without torch's version counter: values checked above
            assert lag._version == version


def _kinds_test_gradients(n_steps: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Tensors whose lags are: one (every coordinate started at step 1); per element (a dense layer but for a few
    coordinates starting late, one never); per row (rows starting at different steps, some never); per row until
    a row starts with a zero inside it (then per element); and 1-D with coordinates starting at different steps."""
    g = torch.Generator().manual_seed(11)
    shapes = [(128, 128), (128, 128), (1100, 16), (1025, 16), (20_000,)]
    starts = [
        torch.ones(128, 128, dtype=torch.long),
        torch.ones(128, 128, dtype=torch.long),
        torch.randint(1, 40, (1100, 1), generator=g).repeat(1, 16),
        torch.randint(1, 10, (1025, 1), generator=g).repeat(1, 16),
        torch.randint(1, 40, (20_000,), generator=g),
    ]
    starts[1].view(-1)[[3, 700, 701, 4000]] = torch.tensor([5, 12, 12, 10**6])
    starts[2][::9] = 10**6
    starts[3][7] = 10**6
    grads = []
    for t in range(1, n_steps + 1):
        step = [torch.randn(s, generator=g) * (start <= t) for s, start in zip(shapes, starts)]
        if t == 25:  # a row that has not started gets a gradient with a zero in it
            step[3][7] = torch.randn(16, generator=g)
            step[3][7, 3] = 0.0
        if t % 9 == 0:  # started coordinates keep counting through zero gradients
            step[0][5].zero_()
        grads.append(step)
    params0 = [torch.randn(s, generator=g) for s in shapes]
    return params0, grads


@pytest.mark.parametrize("impl", IMPLS)
def test_every_layout_gives_the_bits_of_lags_per_element(impl, monkeypatch):
    """One lag for a tensor, one per row: the same coefficients as one per element, to the bit, across a
    checkpoint (which picks the layouts again) and a row that starts in part (the tensor then goes per element)."""
    params0, grads = _kinds_test_gradients(40)
    params, opt = _run_with_checkpoint(impl, params0, grads, at=17)
    assert _layouts(opt, params) == _expected(impl, [TENSOR, ELEMENT, ROW, ELEMENT, ELEMENT])
    with monkeypatch.context() as patch:
        _lags_per_element_only(patch)
        expected, other = _run_with_checkpoint(impl, params0, grads, at=17)
    assert _layouts(other, expected) == [ELEMENT] * 5
    _assert_bitwise(params, opt, expected, other)


def test_a_row_cut_by_the_thread_split_starts_whole(monkeypatch):
    """The C++ kernel splits a step's elements between threads without regard to rows: the thread holding a row's
    first element decides for the whole row, so a row that starts while cut in two starts whole."""
    rows, length = 1001, 33  # 33,033 elements: two threads split row 500
    g = torch.Generator().manual_seed(3)
    start = torch.randint(1, 6, (rows, 1), generator=g).repeat(1, length)
    start[500] = 3
    grads = [[torch.randn(rows, length, generator=g) * (start <= t)] for t in range(1, 9)]
    params0 = [torch.randn(rows, length, generator=g)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params, opt = run_torch(params0, grads, impl="fused", **HYPER)
        with monkeypatch.context() as patch:
            _lags_per_element_only(patch)
            expected, other = run_torch(params0, grads, impl="fused", **HYPER)
    finally:
        torch.set_num_threads(threads)
    assert _layouts(opt, params) == [ROW]
    _assert_bitwise(params, opt, expected, other)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_walked_by_the_cpu_kernel_give_the_per_element_bits(threads, dtype, monkeypatch):
    """The C++ kernel's walk by row (stretches of rows with one lag, rows that start whole, one with a NaN in its
    gradient, rows cut by the thread split, rows that start in part: then per element) against lags per element,
    across a checkpoint."""
    rows, length = 741, 23  # 17,043 elements: thread splits fall inside rows
    g = torch.Generator().manual_seed(5)
    start = torch.randint(1, 14, (rows, 1), generator=g).repeat(1, length)
    start[::7] = 10**6  # never
    start[100:400] = 10**6  # a long stretch that never starts
    grads = []
    for t in range(1, 16):
        grad = torch.randn(rows, length, generator=g) * (start <= t)
        if t == 6:
            grad[3, :5] = 0.0  # started rows keep counting through zero gradients
        if t == 9:
            grad[21] = torch.randn(length, generator=g)  # starts whole: NaN is a non-zero gradient
            grad[21, 4] = float("nan")
        if t == 12:  # rows 7 and 14 start in part: the tensor goes per element from here
            grad[7, 2], grad[14, :] = 1.0, torch.randn(length, generator=g)
            grad[14, 11] = 0.0
        grads.append([grad.to(dtype)])
    params0 = [torch.randn(rows, length, generator=g).to(dtype)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)  # bf16 moments round stochastically: both runs draw the same random streams
        params, opt = _run_with_checkpoint("fused", params0, grads, at=4)
        with monkeypatch.context() as patch:
            _lags_per_element_only(patch)
            torch.manual_seed(0)
            expected, other = run_torch(params0, grads, impl="fused", **HYPER)
    finally:
        torch.set_num_threads(previous)
    assert _layouts(opt, params) == [ELEMENT]
    _assert_bitwise(params, opt, expected, other)  # bitwise, NaN in row 21 included


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_params_keep_their_layout_through_rows_and_checkpoints(impl, monkeypatch):
    """A channels_last conv weight whose output channels start at different steps: lags per row, walked in place
    (each row is one block of memory); lags per element, after a checkpoint, in the param's memory format."""
    g = torch.Generator().manual_seed(6)
    shape = (8, 4, 3, 3)
    start = torch.arange(8).view(8, 1, 1, 1) % 4 * 2 + 1  # rows start at steps 1, 3, 5, 7
    grads = [[(torch.randn(shape, generator=g) * (start <= t)).contiguous(memory_format=torch.channels_last)]
             for t in range(1, 9)]  # fmt: skip
    grads[4][0][2, 1] = 0.0  # row 2 starts at step 5 with a zero in it: lags per element from then on
    params0 = [torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)]
    params, opt = _run_with_checkpoint(impl, params0, grads, at=6)
    lag = opt.state[params[0]]["coord_lag"]
    assert guard.layout_of(lag, shape) == ELEMENT and lag.stride() == params[0].stride()
    with monkeypatch.context() as patch:
        _lags_per_element_only(patch)
        expected, other = _run_with_checkpoint(impl, params0, grads, at=6)
    _assert_bitwise(params, opt, expected, other)
    rows_only, rows_opt = run_torch(params0, grads[:4], impl=impl, **HYPER)
    assert _layouts(rows_opt, rows_only) == _expected(impl, [ROW])


def test_switching_implementations_mid_run_gives_the_per_element_bits(monkeypatch):
    """Every implementation reads and writes the same lags: a run that switches between them (a fused step among
    for-loop steps while a row starts in part) is the run with lags per element."""

    def run():
        g = torch.Generator().manual_seed(0)
        p = torch.randn(20, 16, generator=g).requires_grad_()
        opt = AdamNX([p], foreach=False, **HYPER)
        for t in range(1, 13):
            gr = torch.randn(20, 16, generator=g)
            if t < 6:
                gr[10:] = 0  # rows 10.. have not started
            elif t < 9:
                gr[10:, 3] = 0  # they start with a zero inside (column 3 starts at step 9)
            opt.param_groups[0]["fused"] = t in (6, 7)
            opt.param_groups[0]["foreach"] = False if t in (6, 7) else t % 2 == 0
            p.grad = gr
            opt.step()
        return [p], opt

    params, opt = run()
    with monkeypatch.context() as patch:
        _lags_per_element_only(patch)
        expected, other = run()
    _assert_bitwise(params, opt, expected, other)


@pytest.mark.parametrize("impl", IMPLS)
def test_lags_edited_in_place_are_read_at_the_next_step(impl):
    """The lags are the state itself, with nothing kept beside them: an edit, even through ``.data``, is read at the
    next step. Here row 5 of an embedding restarts at step 11, by an edit in place and by a state dict whose counts
    say so: the same run."""
    g = torch.Generator().manual_seed(4)
    start = torch.randint(1, 5, (64, 1), generator=g).repeat(1, 16)
    grads = [[torch.randn(64, 16, generator=g) * (start <= t)] for t in range(1, 31)]
    params0 = [torch.randn(64, 16, generator=g)]

    def run(edit):
        params, opt = run_torch(params0, grads[:10], impl=impl, **HYPER)
        edit(opt, params[0])
        _step_through(opt, params, grads[10:])
        return params, opt

    def in_place(opt, p):
        state = opt.state[p]
        assert guard.layout_of(state["coord_lag"], p.shape) == _expected(impl, [ROW])[0]
        state["coord_lag"].data[5] = NOT_STARTED
        state["exp_avg"][5], state["exp_avg_sq"][5] = 0.0, 0.0

    def through_the_state_dict(opt, p):
        saved = opt.state_dict()
        for key in ("coord_step", "exp_avg", "exp_avg_sq"):
            saved["state"][0][key][5] = 0
        opt.load_state_dict(saved)

    params, opt = run(in_place)
    assert _counts(opt, params[0])[5].eq(20).all()  # restarted: counted from step 11 to 30
    expected, other = run(through_the_state_dict)
    _assert_bitwise(params, opt, expected, other)


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_edited_through_the_state_dict_are_taken(impl, monkeypatch):
    """A coordinate of a dense layer restarted through the state dict (its count set to 0) counts again from its
    next non-zero gradient; the tensor keeps its lags per element from then on."""
    params0, grads = _kinds_test_gradients(30)

    def run():
        params, opt = run_torch(params0, grads[:10], impl=impl, **HYPER)
        saved = opt.state_dict()
        for key in ("coord_step", "exp_avg", "exp_avg_sq"):
            saved["state"][0][key][2, 2] = 0
        opt.load_state_dict(saved)
        _step_through(opt, params, grads[10:])
        return params, opt

    params, opt = run()
    counts = _counts(opt, params[0])
    assert counts[2, 2] == 20 and counts[0, 0] == 30
    with monkeypatch.context() as patch:
        _lags_per_element_only(patch)
        expected, other = run()
    _assert_bitwise(params, opt, expected, other)


# --------------------------------------------------------------------------- saturation and the window


def _state_at(opt, p, step: float, counts: list[int]) -> None:
    """Put the param's state at tensor step ``step`` with these counts, through a state dict (a coordinate with count
    0 has not started: its moments are 0, or the load would count it from the tensor's step)."""
    saved = opt.state_dict()
    state = saved["state"][0]
    state["step"] = torch.tensor(step, dtype=torch.float64)
    state["coord_step"] = torch.tensor(counts, dtype=torch.int32)
    for key in ("exp_avg", "exp_avg_sq"):
        state[key] = state[key].masked_fill(state["coord_step"] == 0, 0.0)
    opt.load_state_dict(saved)


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_saturate_at_the_int32_maximum(impl):
    p = torch.nn.Parameter(torch.ones(4))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-3, per_coordinate_steps=True)
    p.grad = torch.ones(4)
    opt.step()
    _state_at(opt, p, 2.0**31 + 5, [MAX_COUNT - 1, MAX_COUNT, 0, 3])
    p.grad = torch.tensor([1.0, 1.0, 0.0, 1.0])
    opt.step()
    assert _counts(opt, p).tolist() == [MAX_COUNT, MAX_COUNT, 0, 4]
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_lags_shift_to_a_new_window_and_counts_go_on(impl):
    """Lags are int32, relative to a base that moves by 2^30 steps: crossing it, every count goes on, a coordinate
    that starts there counts from 1, one that has not started stays at 0, and a saturated one stays saturated."""
    p = torch.nn.Parameter(torch.ones(5))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-3, per_coordinate_steps=True)
    p.grad = torch.ones(5)
    opt.step()
    _state_at(opt, p, 2.0 * WINDOW - 2, [0, 1, 7, MAX_COUNT - 3, 0])
    for t in range(4):  # steps 2^31 − 1, 2^31 (a new window), 2^31 + 1, 2^31 + 2
        p.grad = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0 if t == 1 else 0.0])
        opt.step()
    assert _counts(opt, p).tolist() == [0, 5, 11, MAX_COUNT, 3]
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_past_the_first_window_counts_longer_than_the_relative_step_take_their_own_coefficients(impl):
    """Past step 2^30 the relative step starts over while counts go on: the table is sized by the counts (the lags),
    so a count of 2^30 + 3 is not read as the table's last row."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-3, betas=(0.9, 0.9999), per_coordinate_steps=True)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    step, counts = WINDOW + 2.0, [WINDOW + 2, WINDOW + 2, WINDOW + 2, 3]
    saved = opt.state_dict()
    saved["state"][0].update(
        step=torch.tensor(step, dtype=torch.float64),
        coord_step=torch.tensor(counts, dtype=torch.int32),
        exp_avg_sq=torch.ones(4, dtype=torch.float64),
    )
    opt.load_state_dict(saved)
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    p.grad = grad.clone()
    opt.step()
    _, w2 = coefficients(torch.tensor(counts, dtype=torch.float64) + 1, (0.9, 0.9999))
    expected = (1 - w2) + w2 * grad**2
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], expected, rtol=1e-12, atol=0)
    assert _counts(opt, p).tolist() == [c + 1 for c in counts]


def _as_on_a_gpu(monkeypatch):
    """The accelerator kernel with its counters on the device, as fused=True runs on CUDA: a copy of its row that
    the planner takes for capturable (so it plans on the device), and GradScaler's found_inf not read on the host."""
    from adamnx import backends, plan

    row = dataclasses.replace(backends.BACKENDS["fused-inductor"], name="on-device", capturable=True)
    monkeypatch.setitem(backends.BACKENDS, "on-device", row)
    monkeypatch.setattr(plan, "_readable_on_host", lambda t: False)
    return lambda params, **kw: _OnDevice(params, fused=True, capturable=True, **kw)


class _OnDevice(AdamNX):
    def step(self, closure=None):
        from adamnx import backends

        with backends.selected("on-device"):
            return super().step(closure)


def test_on_the_device_a_new_window_shifts_the_lags_once(monkeypatch):
    make = _as_on_a_gpu(monkeypatch)
    p = torch.nn.Parameter(torch.ones(3))
    opt = make([p], lr=1e-2, per_coordinate_steps=True)
    p.grad = torch.ones(3)
    opt.step()
    _state_at(opt, p, WINDOW - 1.0, [5, 0, WINDOW - 2])
    for _ in range(2):  # steps 2^30 (a new window) and 2^30 + 1
        p.grad = torch.ones(3)
        opt.step()
    assert _counts(opt, p).tolist() == [7, 2, WINDOW]


def test_on_the_device_a_step_gradscaler_skips_starts_nothing(monkeypatch):
    make = _as_on_a_gpu(monkeypatch)
    p = torch.nn.Parameter(torch.ones(4))
    opt = make([p], lr=1e-2, per_coordinate_steps=True)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # an overflow: nothing may change
    p.grad = torch.full((4,), float("inf"))
    opt.step()
    assert opt.state[p]["step"].item() == 0 and _counts(opt, p).eq(0).all()
    opt.found_inf = torch.tensor(0.0)
    p.grad = torch.full((4,), 2.0)
    opt.step()
    assert _counts(opt, p).eq(1).all() and opt.state[p]["exp_avg_sq"].eq(4.0).all()  # its own t = 1: v = g²


# --------------------------------------------------------------------------- the coefficient table


def _no_count(*args):
    raise AssertionError("the table asked for the longest count although the step alone sizes it")


def test_table_rows_are_the_host_coefficients_bitwise():
    rows = coordinate_table(10_000, _no_count, 0.9, 0.99, torch.float64, torch.device("cpu"))
    assert rows.shape[0] == 3 and rows.shape[1] >= 10_001
    assert rows[:, 0].tolist() == [1.0, 0.0, 1.0]  # count 0 (not started): t = 1's values
    assert torch.equal(rows[:, 0], rows[:, 1])  # so a coordinate that starts takes them whether counted 0 or 1
    for t in (1, 2, 3, 100, 4095, 4096, 4097, 8191, 10_000):
        w1, w2 = host_coefficients(t, 0.9, 0.99)
        assert rows[:, t].tolist() == [w1, 1 - w2, w2]
    rows32 = coordinate_table(10_000, _no_count, 0.9, 0.99, torch.float32, torch.device("cpu"))
    assert torch.equal(rows32[:, : rows.shape[1]], rows.to(torch.float32)[:, : rows32.shape[1]])


def test_a_complete_table_ends_where_the_coefficients_stop_changing():
    rows = coordinate_table(10**8, lambda: 10**8 - 1, 0.9, 0.9, torch.float32, torch.device("cpu"))  # H ≈ 95
    assert rows.shape[1] < 2**15
    last = rows[:, -1]
    for t in (rows.shape[1], 10**6, 10**8, 2**31 - 1):
        w1, w2 = coefficients(torch.tensor([float(t)], dtype=torch.float64), (0.9, 0.9))
        assert torch.equal(torch.stack([w1[0], 1 - w2[0], w2[0]]).float(), last)


def test_a_huge_step_with_short_counts_builds_a_short_table(monkeypatch):
    """A step of 10⁹ whose coordinates started late: the table is sized by the counts, not by the step."""
    monkeypatch.setattr(table_module, "_TABLES", type(table_module._TABLES)())
    rows = coordinate_table(1e9, lambda: 7, 0.9, 0.9999, torch.float32, torch.device("cpu"))
    assert 8 <= rows.shape[1] <= 4096


def test_tables_grow_by_doubling_and_few_are_kept(monkeypatch):
    monkeypatch.setattr(table_module, "_TABLES", type(table_module._TABLES)())
    cpu = torch.device("cpu")
    lengths = [coordinate_table(n, _no_count, 0.9, 0.999, torch.float32, cpu).shape[1] for n in (1, 4096, 9000, 20_000)]
    assert lengths == [4096, 8192, 16384, 32768]
    for k in range(20):  # a β2 schedule: a new table per value, and only the latest few stay
        coordinate_table(10, _no_count, 0.9, 0.99 + k * 1e-4, torch.float32, cpu)
    assert len(table_module._TABLES) == table_module._MAX_TABLES


def test_a_fresh_table_at_a_late_step_is_sized_by_the_counts(monkeypatch):
    """Betas that change every step build a new table every step: sized by the counts, not by the step."""
    monkeypatch.setattr(table_module, "_TABLES", type(table_module._TABLES)())
    rows = coordinate_table(10**6, lambda: 7, 0.9, 0.99, torch.float32, torch.device("cpu"))
    assert rows.shape[1] == 4096


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_too_long_for_a_table_get_their_coefficients_evaluated_per_element(impl, monkeypatch):
    """β2 = 0.9999 keeps its coefficients changing for 10⁹ steps: past MAX_TABLE_ROWS no table is built, every
    coordinate's coefficients are evaluated from its count, and memory stays bounded."""
    monkeypatch.setattr(table_module, "MAX_TABLE_ROWS", 8192)
    monkeypatch.setattr(table_module, "_TABLES", type(table_module._TABLES)())
    results = {}
    for name in (impl, "capturable"):  # capturable always evaluates per element: the comparison
        p = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
        opt = IMPLEMENTATIONS[name]([p], lr=1e-2, betas=(0.9, 0.9999), per_coordinate_steps=True)
        p.grad = torch.ones(6, dtype=torch.float64)
        opt.step()
        _state_at(opt, p, 20_000, [0, 1, 5_000, 9_000, 15_000, 20_000])
        for k in range(3):
            p.grad = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64) * (k + 1)
            opt.step()
        results[name] = (p.detach().clone(), opt.state[p]["exp_avg_sq"].clone(), _counts(opt, p))
    assert torch.equal(results[impl][2], torch.tensor([0, 4, 5_003, 9_003, 15_003, 20_003], dtype=torch.int32))
    for a, b in zip(results[impl], results["capturable"]):
        assert rel_err(a, b.numpy()) <= 1e-12
    assert all(t.rows.shape[1] <= 8192 for t in table_module._TABLES.values())
