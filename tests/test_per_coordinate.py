"""per_coordinate_steps on every implementation: the paper's trajectory per coordinate, the implementations equal to
each other, GradScaler, checkpoints, saturation, and the coefficient table the kernels gather from."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import adamnx._fused
import adamnx._tensors as tensors_module
from adamnx import AdamNX
from adamnx._tensors import MAX_COUNT, coordinate_table, host_coefficients
from adamnx.schedule import coefficients
from helpers import (
    IMPLEMENTATIONS,
    initial_params,
    late_starting_gradients,
    per_coordinate_reference,
    rel_err,
    run_torch,
)

IMPLS = list(IMPLEMENTATIONS)
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "per_coordinate_steps": True}


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
        state = opt.state[p]
        assert state["coord_step"].dtype == torch.int32
        np.testing.assert_array_equal(state["coord_step"].numpy(), count)
        # float64 throughout, the same coefficient function: rounding only (seen: ≤ 1e-14)
        for actual, expected in ((p, theta), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
            assert rel_err(actual, expected) <= 1e-12


@pytest.mark.parametrize("impl", ["foreach", "fused", "fused-inductor", "capturable"])
def test_float32_implementations_equal_the_for_loop(impl):
    grads = late_starting_gradients(1_000, dtype=torch.float32, seed=2)
    params0 = initial_params(dtype=torch.float32)
    expected, loop = run_torch(params0, grads, impl="for-loop", **HYPER)
    params, opt = run_torch(params0, grads, impl=impl, **HYPER)
    for p, q in zip(params, expected):
        assert torch.equal(opt.state[p]["coord_step"], loop.state[q]["coord_step"])
        if impl == "foreach":  # the same torch ops in the same order
            assert torch.equal(p, q)
        else:
            # fused kernels contract a·b + c into FMAs and capturable evaluates the coefficients on the device:
            # one rounding per step apart, which 1,000 steps of a contracting map keep at a few ulps (seen: 3e-7)
            assert rel_err(p, q.detach().double().numpy()) <= 1e-5


@pytest.mark.parametrize("impl", ["foreach", "fused", "fused-inductor"])
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
        assert torch.equal(opt.state[p]["coord_step"], loop.state[q]["coord_step"])
        assert rel_err(p, q.detach().numpy()) <= 1e-12  # float64: rounding only


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
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


@pytest.mark.parametrize("impl", ["foreach", "fused", "fused-inductor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_float32_state(impl, dtype):
    grads = late_starting_gradients(60, dtype=dtype, seed=5)
    params0 = initial_params(dtype=dtype)
    kw = {**HYPER, "state_dtype": torch.float32}
    expected, loop = run_torch(params0, grads, impl="for-loop", **kw)
    params, opt = run_torch(params0, grads, impl=impl, **kw)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one rounding of the param, relative
    for p, q in zip(params, expected):
        assert torch.equal(opt.state[p]["coord_step"], loop.state[q]["coord_step"])
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q.detach().float(), rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused", "fused-inductor"])
def test_stochastic_rounding_with_per_coordinate_steps(impl):
    """A bf16 step rounds the float32 result up or down: a float32 twin started from the same state computes that
    result, so each param lands within one bf16 ulp of it, and the counts advance alike."""
    grads = late_starting_gradients(20, dtype=torch.bfloat16, seed=6)
    kw = {**HYPER, "state_dtype": torch.float32, "stochastic_rounding": True}
    params, opt = run_torch(initial_params(dtype=torch.bfloat16), grads[:19], impl=impl, **kw)
    twin = [p.detach().float().requires_grad_(True) for p in params]  # exact: bf16 ⊂ float32
    twin_opt = AdamNX(twin, foreach=False, **HYPER)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0].update(foreach=False, fused=None)
    twin_opt.load_state_dict(saved)
    for group, (ps, o) in ((grads[19], (params, opt)), (grads[19], (twin, twin_opt))):
        for p, g in zip(ps, group):
            p.grad = g.to(p.dtype)
        o.step()
    for p, x in zip(params, twin):
        assert torch.equal(opt.state[p]["coord_step"], twin_opt.state[x]["coord_step"])
        x = x.detach()
        ulp = torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)
        assert ((p.detach().float() - x).abs() <= ulp * (1 + 2.0**-10)).all()


@pytest.mark.parametrize("impl", ["fused", "fused-inductor"])
def test_grad_scaler_overflow_skips_the_counts_too(impl):
    """The fused kernels honour GradScaler's found_inf with the guard on: a skipped step changes nothing."""
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
    counts = opt.state[model.weight]["coord_step"]
    assert torch.equal(counts, loop.state[plain.weight]["coord_step"])
    assert counts[:, 4].eq(0).all() and counts[:, :4].eq(5).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_checkpoint_round_trip_continues_bitwise(impl):
    grads = late_starting_gradients(80, dtype=torch.float32, seed=7)
    params0 = initial_params(dtype=torch.float32)
    straight, straight_opt = run_torch(params0, grads, impl=impl, **HYPER)
    first, first_opt = run_torch(params0, grads[:40], impl=impl, **HYPER)
    saved = copy.deepcopy(first_opt.state_dict())
    resumed = [p.detach().clone().requires_grad_(True) for p in first]
    opt = IMPLEMENTATIONS[impl](resumed, **HYPER)
    opt.load_state_dict(saved)
    for step in grads[40:]:
        for p, g in zip(resumed, step):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq", "coord_step"):
            a, b = opt.state[p][key], straight_opt.state[q][key]
            assert a.dtype == b.dtype and torch.equal(a, b), key


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_saturate_at_the_int32_maximum(impl):
    p = torch.nn.Parameter(torch.ones(4))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-3, per_coordinate_steps=True)
    p.grad = torch.ones(4)
    opt.step()
    opt.state[p]["step"].fill_(2.0**31 + 5)
    opt.state[p]["coord_step"].copy_(torch.tensor([MAX_COUNT - 1, MAX_COUNT, 0, 3], dtype=torch.int32))
    p.grad = torch.tensor([1.0, 1.0, 0.0, 1.0])
    opt.step()
    assert opt.state[p]["coord_step"].tolist() == [MAX_COUNT, MAX_COUNT, 0, 4]
    assert torch.isfinite(p).all()


# --------------------------------------------------------------------------- the coefficient table


def test_table_rows_are_the_host_coefficients_bitwise():
    rows = coordinate_table(10_000, [], 0.9, 0.99, torch.float64, torch.device("cpu"))
    assert rows.shape[0] == 3 and rows.shape[1] >= 10_001
    assert rows[:, 0].tolist() == [1.0, 0.0, 1.0]  # count 0 (not started): t = 1's values
    for t in (1, 2, 3, 100, 4095, 4096, 4097, 8191, 10_000):
        w1, w2 = host_coefficients(t, 0.9, 0.99)
        assert rows[:, t].tolist() == [w1, 1 - w2, w2]
    rows32 = coordinate_table(10_000, [], 0.9, 0.99, torch.float32, torch.device("cpu"))
    assert torch.equal(rows32[:, : rows.shape[1]], rows.to(torch.float32)[:, : rows32.shape[1]])


def test_a_complete_table_ends_where_the_coefficients_stop_changing():
    counts = [torch.tensor([10**8 - 1], dtype=torch.int32)]
    rows = coordinate_table(10**8, counts, 0.9, 0.9, torch.float32, torch.device("cpu"))  # H ≈ 95: done by ~10⁴
    assert rows.shape[1] < 2**15
    last = rows[:, -1]
    for t in (rows.shape[1], 10**6, 10**8, 2**31 - 1):
        w1, w2 = coefficients(torch.tensor([float(t)], dtype=torch.float64), (0.9, 0.9))
        assert torch.equal(torch.stack([w1[0], 1 - w2[0], w2[0]]).float(), last)


def test_a_huge_step_with_short_counts_builds_a_short_table(monkeypatch):
    """A step of 10⁹ whose coordinates started late: the table is sized by the counts, not by the step."""
    monkeypatch.setattr(tensors_module, "_TABLES", type(tensors_module._TABLES)())
    counts = [torch.tensor([0, 3, 7], dtype=torch.int32)]
    rows = coordinate_table(1e9, counts, 0.9, 0.9999, torch.float32, torch.device("cpu"))
    assert 8 <= rows.shape[1] <= 4096


def test_tables_grow_by_doubling_and_few_are_kept(monkeypatch):
    monkeypatch.setattr(tensors_module, "_TABLES", type(tensors_module._TABLES)())
    cpu = torch.device("cpu")
    lengths = [coordinate_table(n, [], 0.9, 0.999, torch.float32, cpu).shape[1] for n in (1, 4096, 9000, 20_000)]
    assert lengths == [4096, 8192, 16384, 32768]
    for k in range(20):  # a β2 schedule: a new table per value, and only the latest few stay
        coordinate_table(10, [], 0.9, 0.99 + k * 1e-4, torch.float32, cpu)
    assert len(tensors_module._TABLES) == tensors_module._MAX_TABLES


@pytest.mark.parametrize("impl", IMPLS)
def test_counts_too_long_for_a_table_get_their_coefficients_evaluated_per_element(impl, monkeypatch):
    """β2 = 0.9999 keeps its coefficients changing for 10⁹ steps: past MAX_TABLE_ROWS no table is built, every
    coordinate's coefficients are evaluated from its count, and memory stays bounded."""
    monkeypatch.setattr(tensors_module, "MAX_TABLE_ROWS", 8192)
    monkeypatch.setattr(tensors_module, "_TABLES", type(tensors_module._TABLES)())
    results = {}
    for name in (impl, "capturable"):  # capturable always evaluates per element: the comparison
        p = torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
        opt = IMPLEMENTATIONS[name]([p], lr=1e-2, betas=(0.9, 0.9999), per_coordinate_steps=True)
        p.grad = torch.ones(6, dtype=torch.float64)
        opt.step()
        opt.state[p]["step"].fill_(20_000)
        opt.state[p]["coord_step"].copy_(torch.tensor([0, 1, 5_000, 9_000, 15_000, 20_000], dtype=torch.int32))
        for k in range(3):
            p.grad = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64) * (k + 1)
            opt.step()
        results[name] = (p.detach().clone(), opt.state[p]["exp_avg_sq"].clone(), opt.state[p]["coord_step"].clone())
    assert torch.equal(results[impl][2], torch.tensor([0, 4, 5_003, 9_003, 15_003, 20_003], dtype=torch.int32))
    for a, b in zip(results[impl], results["capturable"]):
        assert rel_err(a, b.numpy()) <= 1e-12
    assert all(t.rows.shape[1] <= 8192 for t in tensors_module._TABLES.values())


def test_a_fresh_table_at_a_late_step_is_sized_by_the_counts(monkeypatch):
    """Betas that change every step build a new table every step: sized by the counts, not by the step."""
    monkeypatch.setattr(tensors_module, "_TABLES", type(tensors_module._TABLES)())
    counts = [torch.tensor([0, 3, 7], dtype=torch.int32)]
    rows = coordinate_table(10**6, counts, 0.9, 0.99, torch.float32, torch.device("cpu"))
    assert rows.shape[1] == 4096


# --------------------------------------------------------------------------- what is known of the counts
# The host paths (for-loop, foreach, the fused kernels) skip work that the counts' shape makes unnecessary: a tensor
# whose counts are on its step takes its own coefficients (its few exceptions updated apart), an embedding one set
# per row. These fast paths must give the bits of the per-element path, which is forced here by having nothing
# recognised.


def _kinds_test_gradients(n_steps: int) -> tuple[list[tuple[int, ...]], list[list[torch.Tensor]]]:
    """Tensors meant to be seen as: on step; on step but for a few exceptions (coordinates starting late, one
    never); by row (rows starting at different steps, some never); by row until a row starts with a zero inside
    it (then by element); and 1-D with coordinates starting at different steps (by element)."""
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


def _per_element_only(monkeypatch):
    """Nothing is recognised: every tensor goes element by element."""
    unknown = tensors_module.KnownCounts(tensors_module.BY_ELEMENT)
    for module in (tensors_module, adamnx._fused):
        monkeypatch.setattr(module, "observe_counts", lambda count, step: unknown)
    for module in (tensors_module, adamnx._fused):
        monkeypatch.setattr(module, "off_step_coordinates", lambda count, step: None)


def test_a_row_cut_by_the_thread_split_starts_as_element_by_element(monkeypatch):
    """The C++ kernel splits a step's elements between threads without regard to rows: a row that starts while
    cut in two goes element by element, and the tensor is looked at again (by row once more: the row started as a
    whole)."""
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
        state = opt.state[params[0]]
        assert tensors_module.known_counts(state["coord_step"], state["step"]).kind == "by row"
        with monkeypatch.context() as patch:
            _per_element_only(patch)
            expected, loop = run_torch(params0, grads, impl="fused", **HYPER)
    finally:
        torch.set_num_threads(threads)
    for key in ("coord_step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], loop.state[expected[0]][key]), key
    assert torch.equal(params[0], expected[0])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_walked_by_the_cpu_kernel_give_the_per_element_bits(threads, dtype, monkeypatch):
    """The C++ kernel's walk by row (stretches of rows with one count, rows that start whole, one with a NaN in its
    gradient, rows cut by the thread split, rows that start in part: then element by element) against element by
    element, across a checkpoint."""
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
        if t == 12:  # rows 7 and 14 start in part: the tensor goes element by element from here
            grad[7, 2], grad[14, :] = 1.0, torch.randn(length, generator=g)
            grad[14, 11] = 0.0
        grads.append([grad.to(dtype)])
    params0 = [torch.randn(rows, length, generator=g).to(dtype)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params, opt = _run_with_checkpoint("fused", params0, grads, at=4)
        with monkeypatch.context() as patch:
            _per_element_only(patch)
            expected, loop = run_torch(params0, grads, impl="fused", **HYPER)
    finally:
        torch.set_num_threads(previous)
    state, other = opt.state[params[0]], loop.state[expected[0]]
    assert torch.equal(state["coord_step"], other["coord_step"])
    for ours, theirs in (
        (state["exp_avg"], other["exp_avg"]),
        (state["exp_avg_sq"], other["exp_avg_sq"]),
        (params[0], expected[0]),
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)  # bitwise, NaN in row 21 included


def _run_with_checkpoint(impl, params0, grads, at: int):
    """Run, save a state dict after ``at`` steps, load it into a new optimizer, and finish the run with that one."""
    params, opt = run_torch(params0, grads[:at], impl=impl, **HYPER)
    saved = copy.deepcopy(opt.state_dict())
    resumed = IMPLEMENTATIONS[impl](params, **HYPER)
    resumed.load_state_dict(saved)
    _step_through(resumed, params, grads[at:])
    return params, resumed


def _step_through(opt, params, grads) -> None:
    """Step ``opt`` once per entry of ``grads`` (one gradient per param)."""
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused", "fused-inductor"])
def test_recognised_counts_give_the_per_element_bits(impl, monkeypatch):
    params0, grads = _kinds_test_gradients(40)
    params, opt = _run_with_checkpoint(impl, params0, grads, at=17)  # the loaded counts are looked at again
    if impl != "fused-inductor":  # the inductor kernel knows on step only
        kinds = [tensors_module.known_counts(opt.state[p]["coord_step"], opt.state[p]["step"]) for p in params]
        assert [k[0] for k in kinds] == ["on step", "on step", "by row", "by element", "by element"]
        assert kinds[0][1] is None and kinds[1][1].tolist() == [3, 700, 701, 4000]
    with monkeypatch.context() as patch:
        _per_element_only(patch)
        expected, loop = run_torch(params0, grads, impl=impl, **HYPER)
    for p, q in zip(params, expected):
        for key in ("coord_step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], loop.state[q][key]), key
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused", "fused-inductor"])
def test_counts_edited_in_place_are_looked_at_again(impl, monkeypatch):
    """A count changed behind the optimizer's back (here: one coordinate restarted) is not taken for on step."""
    params0, grads = _kinds_test_gradients(30)

    def run():
        params, opt = run_torch(params0, grads[:10], impl=impl, **HYPER)
        opt.state[params[0]]["coord_step"][2, 2] = 0
        opt.state[params[0]]["exp_avg"][2, 2] = 0.0
        opt.state[params[0]]["exp_avg_sq"][2, 2] = 0.0
        _step_through(opt, params, grads[10:])
        return params, opt

    params, opt = run()
    assert opt.state[params[0]]["coord_step"][2, 2] == 20 and opt.state[params[0]]["coord_step"][0, 0] == 30
    with monkeypatch.context() as patch:
        _per_element_only(patch)
        expected, _ = run()
    for p, q in zip(params, expected):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
def test_counts_edited_past_the_version_counter_are_seen_after_a_state_dict_round_trip(impl, monkeypatch):
    """An edit through ``.data`` does not bump the count tensor's version, so the fast paths cannot see it; the
    documented remedy, ``opt.load_state_dict(opt.state_dict())`` after the edit, makes every count looked at again."""
    params0, grads = _kinds_test_gradients(30)  # tensor 2 is by row

    def run():
        params, opt = run_torch(params0, grads[:10], impl=impl, **HYPER)
        state = opt.state[params[2]]
        state["coord_step"].data[5] = 0  # restart row 5 (re-initialised, say)
        state["exp_avg"].data[5], state["exp_avg_sq"].data[5] = 0.0, 0.0
        opt.load_state_dict(opt.state_dict())
        _step_through(opt, params, grads[10:])
        return params, opt

    params, opt = run()
    assert opt.state[params[2]]["coord_step"][5].eq(20).all()  # restarted: counted from step 11 to 30
    with monkeypatch.context() as patch:
        _per_element_only(patch)
        expected, loop = run()
    for p, q in zip(params, expected):
        assert torch.equal(opt.state[p]["coord_step"], loop.state[q]["coord_step"])
        assert torch.equal(p, q)
