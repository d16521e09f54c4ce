"""The optax twin: optax's contrib battery in spirit, and parity with the reference and the torch optimizer."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from adamnx import AdamNX  # noqa: E402
from adamnx.optax import ScaleByAdamNXPerCoordinateState, ScaleByAdamNXState, adamnx, scale_by_adamnx  # noqa: E402
from adamnx.reference import AdamNXReference  # noqa: E402
from helpers import gradient_sequence, initial_params, late_starting_gradients, per_coordinate_reference, run_torch  # noqa: E402

SHAPES = [(5, 3), (7,), ()]


def _run_optax(tx, params0, grads_seq, dtype):
    params = [jnp.asarray(p.numpy(), dtype=dtype) for p in params0]
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update([jnp.asarray(g.numpy(), dtype=dtype) for g in grads], state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _run_optax_scanned(tx, params0, grads_seq, dtype):
    """``_run_optax`` as one ``lax.scan`` (one compile, no per-step dispatch: 1,000 steps in milliseconds)."""
    params = [jnp.asarray(p.numpy(), dtype=dtype) for p in params0]
    stacked = [jnp.asarray(np.stack([g[i].numpy() for g in grads_seq]), dtype=dtype) for i in range(len(params))]

    def step(carry, grads):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c, g: jax.lax.scan(step, c, g))((params, tx.init(params)), stacked)
    return params, state


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if b.size else 0.0


@pytest.mark.parametrize(
    "maximize_free_hp", [{"b2": 0.9, "weight_decay": 0.0}, {"b2": 0.99}, {"b2": 0.999, "weight_decay": 0.1}]
)
def test_float64_parity_with_reference_and_torch(maximize_free_hp):
    hp = {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.99, "weight_decay": 0.01, **maximize_free_hp}
    grads = gradient_sequence(1_000, shapes=SHAPES)
    params0 = initial_params(SHAPES)
    with jax.enable_x64(True):
        params, state = _run_optax(adamnx(**hp), params0, grads, jnp.float64)
        params = [np.asarray(p) for p in params]
        mu, nu = (np.asarray(x) for x in state[0].mu), (np.asarray(x) for x in state[0].nu)
    ref = AdamNXReference(
        [p.numpy() for p in params0],
        lr=hp["learning_rate"],
        betas=(hp["b1"], hp["b2"]),
        weight_decay=hp["weight_decay"],
    )
    tparams = [p.clone().requires_grad_(True) for p in params0]
    topt = AdamNX(tparams, lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), weight_decay=hp["weight_decay"])
    for step_grads in grads:
        ref.step([g.numpy() for g in step_grads])
        for p, g in zip(tparams, step_grads):
            p.grad = g.clone()
        topt.step()
    for i, (m, v) in enumerate(zip(mu, nu)):
        assert _rel(params[i], ref.theta[i]) <= 1e-10
        assert _rel(params[i], tparams[i].detach().numpy()) <= 1e-10
        assert _rel(m, ref.m[i]) <= 1e-10 and _rel(v, ref.v[i]) <= 1e-10
    assert int(state[0].count) == 1_000


def test_float32_parity_with_reference_and_torch():
    grads = gradient_sequence(1_000, shapes=SHAPES, dtype=torch.float32)
    params0 = initial_params(SHAPES, dtype=torch.float32)
    params, _ = _run_optax(adamnx(1e-2), params0, grads, jnp.float32)
    ref = AdamNXReference([p.double().numpy() for p in params0], lr=1e-2)
    tparams = [p.clone().requires_grad_(True) for p in params0]
    topt = AdamNX(tparams, lr=1e-2)
    for step_grads in grads:
        ref.step([g.double().numpy() for g in step_grads])
        for p, g in zip(tparams, step_grads):
            p.grad = g.clone()
        topt.step()
    for i, p in enumerate(params):
        assert p.dtype == jnp.float32
        assert _rel(p, ref.theta[i]) <= 1e-5
        assert _rel(p, tparams[i].detach().numpy()) <= 1e-5


@pytest.mark.parametrize("b2", [0.9, 0.99, 0.999, 0.9999])
def test_no_nan_in_float32_at_any_step(b2):
    tx = scale_by_adamnx(b2=b2)
    params = jnp.ones(3)
    for count in (0, 1, 2, 10**4, 10**6, 10**9, 2**31 - 2, 2**31 - 1):
        state = ScaleByAdamNXState(jnp.asarray(count, jnp.int32), jnp.ones(3), jnp.ones(3))
        updates, new_state = tx.update(jnp.array([1.0, -2.0, 0.0]), state, params)
        assert bool(jnp.all(jnp.isfinite(updates))) and bool(jnp.all(jnp.isfinite(new_state.nu)))
        assert int(new_state.count) >= count  # int32 count saturates, never wraps to negative


def test_float32_coefficients_accurate_where_the_naive_form_is_nan():
    from adamnx.schedule import coefficients

    counts = jnp.arange(1, 6, dtype=jnp.float32)
    w1, w2 = coefficients(counts, (0.9, 0.9999))
    exact = [coefficients(float(t), (0.9, 0.9999)) for t in range(1, 6)]
    np.testing.assert_allclose(np.asarray(w2), [e.one_minus_beta2_hat for e in exact], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w1), [e.one_minus_beta1_t for e in exact], rtol=1e-6)
    c = np.float32(0.9999) ** np.float32(1 - np.float32(0.9999))
    with np.errstate(invalid="ignore", divide="ignore"):
        naive = (1 - c ** np.float32(0)) / (1 - c ** np.float32(1))  # β̂2_1 in float32: 0/0 for this β2
    assert np.isnan(naive) or naive != 0.0


def test_extra_args_are_accepted():
    tx = adamnx(1e-3)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    tx.update({"w": jnp.ones(2)}, state, params, value=jnp.array(1.0), some_other_arg=3)


def test_jit_does_not_recompile_on_the_second_call():
    tx = adamnx(optax.linear_schedule(1e-2, 1e-4, 100))
    params = {"w": jnp.ones(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update({"w": jnp.full(4, 0.5)}, state, params)
    assert update._cache_size() == 1


def test_inject_hyperparams_is_equivalent():
    plain = adamnx(learning_rate=3e-3, b1=0.8, b2=0.95, weight_decay=0.05)
    injected = optax.inject_hyperparams(adamnx)(learning_rate=3e-3, b1=0.8, b2=0.95, weight_decay=0.05)
    grads = gradient_sequence(50, shapes=[(4,)], seed=2, dtype=torch.float32)
    params0 = initial_params([(4,)], dtype=torch.float32)
    a, _ = _run_optax(plain, params0, grads, jnp.float32)
    b, state = _run_optax(injected, params0, grads, jnp.float32)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(3e-3)


def test_learning_rate_schedule_scales_weight_decay_like_torch():
    schedule = optax.linear_schedule(1e-2, 1e-3, 20)
    grads = gradient_sequence(30, shapes=[(3, 3)], seed=4, dtype=torch.float32)
    params0 = initial_params([(3, 3)], dtype=torch.float32)
    params, _ = _run_optax(adamnx(schedule, weight_decay=0.3), params0, grads, jnp.float32)
    p = params0[0].clone().requires_grad_(True)
    opt = AdamNX([p], lr=1e-2, weight_decay=0.3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / 1e-2)
    for g in grads:
        p.grad = g[0].clone()
        opt.step()
        sched.step()
    assert _rel(params[0], p.detach().numpy()) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64])
def test_dtypes_are_preserved(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params = {"w": jnp.ones(3, dtype=dtype)}
        tx = adamnx(1e-2)
        state = tx.init(params)
        updates, state = tx.update({"w": jnp.ones(3, dtype=dtype)}, state, params)
        assert updates["w"].dtype == dtype
        assert state[0].mu["w"].dtype == dtype and state[0].nu["w"].dtype == dtype


def test_mu_dtype():
    tx = scale_by_adamnx(mu_dtype=jnp.bfloat16)
    state = tx.init({"w": jnp.ones(3)})
    _, state = tx.update({"w": jnp.ones(3)}, state)
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32


def _nu_means(tx, grads):
    """v's mean after each step of one float32 leaf (a scan: 2,000 steps in one compile)."""

    def step(state, g):
        _, state = tx.update([g], state)
        return state, state.nu[0].astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32).mean()

    _, means = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(tx.init([jnp.zeros(grads.shape[1])]), grads)
    return np.asarray(means, dtype=np.float64)


def test_bf16_moments_round_stochastically_and_track_float32_and_torch():
    """nu_dtype=bf16 (and mu_dtype=bf16): v's mean within 2% of float32 state, before and after the gradients
    shrink tenfold, as torch's state_dtype=torch.bfloat16; round-to-nearest would end 2.5x too high."""
    n, steps = 20_000, 2_000
    gen = torch.Generator().manual_seed(2)
    grads = torch.stack([torch.randn(n, generator=gen) * (1.0 if t < 1_000 else 0.1) for t in range(steps)])
    exact = _nu_means(scale_by_adamnx(b2=0.99), jnp.asarray(grads.numpy()))
    compact_tx = scale_by_adamnx(b2=0.99, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
    compact = _nu_means(compact_tx, jnp.asarray(grads.numpy()))
    p = torch.zeros(n, requires_grad=True)
    opt = AdamNX([p], betas=(0.9, 0.99), state_dtype=torch.bfloat16)
    torch_means = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        torch_means.append(opt.state[p]["exp_avg_sq"].double().mean().item())
    for t in (998, 1_999):
        assert compact[t] == pytest.approx(exact[t], rel=0.02), t
        assert compact[t] == pytest.approx(torch_means[t], rel=0.02), t
    state = compact_tx.init([jnp.zeros(3)])
    assert state.mu[0].dtype == jnp.bfloat16 and state.nu[0].dtype == jnp.bfloat16
    # the same inputs give the same updates: the random stream is the seed's, folded with the step and the leaf
    first = compact_tx.update([jnp.full(3, 0.3)], state)
    again = compact_tx.update([jnp.full(3, 0.3)], state)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))


def test_bf16_params_update_their_moments_in_float32():
    """bf16 params (bf16 moments by default): the moments are computed in float32 and rounded once, as in torch."""
    tx = scale_by_adamnx()
    params = [jnp.zeros(4, dtype=jnp.bfloat16)]
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update([jnp.asarray([1.0, 1e-3, -2.0, 0.0], dtype=jnp.bfloat16)], state)
    assert state.nu[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(state.nu[0], dtype=np.float64), [1.0, 1e-6, 4.0, 0.0], rtol=1e-2)


def test_multisteps_accumulates_gradients():
    k = 4
    grads = gradient_sequence(4 * k, shapes=[(5,)], seed=6, dtype=torch.float32)
    params0 = initial_params([(5,)], dtype=torch.float32)
    multi, _ = _run_optax(optax.MultiSteps(adamnx(1e-2), every_k_schedule=k), params0, grads, jnp.float32)
    averaged = [[sum(g[0] for g in grads[i : i + k]) / k] for i in range(0, len(grads), k)]
    single, _ = _run_optax(adamnx(1e-2), params0, averaged, jnp.float32)
    np.testing.assert_allclose(np.asarray(multi[0]), np.asarray(single[0]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("loss", "start", "solution", "lr", "steps"),
    [
        (lambda p: jnp.sum((p - 3.0) ** 2), jnp.array([0.0, 10.0]), jnp.array([3.0, 3.0]), 0.1, 1_000),
        (
            lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2,
            jnp.array([-1.0, 1.0]),
            jnp.array([1.0, 1.0]),
            3e-2,
            5_000,
        ),
    ],
    ids=["parabola", "rosenbrock"],
)
def test_converges(loss, start, solution, lr, steps):
    tx = adamnx(optax.linear_schedule(lr, lr * 0.01, steps), weight_decay=0.0)
    state = tx.init(start)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    params = start
    for _ in range(steps):
        params, state = step(params, state)
    np.testing.assert_allclose(np.asarray(params), np.asarray(solution), atol=2e-2)


def test_weight_decay_mask():
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    tx = adamnx(0.1, weight_decay=0.5, mask={"w": True, "b": False})
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, state, params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.05)
    np.testing.assert_allclose(np.asarray(updates["b"]), 0.0)


def test_invalid_betas_are_rejected_eagerly():
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        scale_by_adamnx(b2=1.0)


# --------------------------------------------------------------------------- per_coordinate_steps


@pytest.mark.parametrize("b2", [0.9, 0.999])
def test_per_coordinate_float64_parity_with_reference_and_torch(b2):
    hp = {"learning_rate": 1e-2, "b1": 0.9, "b2": b2, "weight_decay": 0.1}
    grads = late_starting_gradients(1_000, SHAPES)
    params0 = initial_params(SHAPES)
    with jax.enable_x64(True):
        params, state = _run_optax_scanned(adamnx(**hp, per_coordinate_steps=True), params0, grads, jnp.float64)
        inner = state[0]
        params = [np.asarray(p) for p in params]
        mu, nu, counts = ([np.asarray(x) for x in tree] for tree in (inner.mu, inner.nu, inner.coord_count))
    ref = per_coordinate_reference(params0, grads, 1e-2, (0.9, b2), 0.1)
    tparams, topt = run_torch(
        params0, grads, lr=1e-2, betas=(0.9, b2), weight_decay=0.1, foreach=False, per_coordinate_steps=True
    )
    assert isinstance(inner, ScaleByAdamNXPerCoordinateState) and int(inner.count) == 1_000
    for i, (theta, m, v, count) in enumerate(ref):
        assert counts[i].dtype == np.int32
        np.testing.assert_array_equal(counts[i], count)
        np.testing.assert_array_equal(counts[i], topt.coord_steps(tparams[i]).numpy())
        # float64 against float64 through the same coefficient function: rounding only (seen: ≤ 4e-15)
        assert _rel(params[i], theta) <= 1e-12 and _rel(params[i], tparams[i].detach().numpy()) <= 1e-12
        assert _rel(mu[i], m) <= 1e-12 and _rel(nu[i], v) <= 1e-12
    assert any((c == 0).any() for c in counts) and max(c.max() for c in counts) == 1_000  # never / always started


def test_per_coordinate_float32_parity_with_reference_and_torch():
    grads = late_starting_gradients(1_000, SHAPES, dtype=torch.float32, seed=3)
    params0 = initial_params(SHAPES, dtype=torch.float32)
    params, _ = _run_optax_scanned(
        adamnx(1e-2, weight_decay=0.1, per_coordinate_steps=True), params0, grads, jnp.float32
    )
    ref = per_coordinate_reference(params0, grads, 1e-2, (0.9, 0.99), 0.1)
    tparams, _ = run_torch(params0, grads, lr=1e-2, weight_decay=0.1, foreach=False, per_coordinate_steps=True)
    for i, (theta, *_) in enumerate(ref):
        # 1,000 float32 steps, each rounding θ, m, v and the coefficients (here per element, in float32; torch's
        # in float64): a few ulp (6e-8) per step that mostly cancel (seen: ≤ 3e-6, for β2 ∈ {0.9, 0.99, 0.999});
        # the same 1e-5 as the shared-count float32 test. Using the shared count instead errs by 1e-3 to 40.
        assert params[i].dtype == jnp.float32
        assert _rel(params[i], theta) <= 1e-5 and _rel(params[i], tparams[i].detach().numpy()) <= 1e-5


def test_per_coordinate_counts_saturate():
    big = 2**31 - 1
    tx = scale_by_adamnx(b2=0.99, per_coordinate_steps=True)
    state = ScaleByAdamNXPerCoordinateState(
        count=jnp.asarray(big - 1, jnp.int32),
        mu=jnp.ones(5),
        nu=jnp.ones(5),
        coord_count=jnp.array([big - 1, big, big, 0, 0], jnp.int32),
    )
    for expected in ([big, big, big, 0, 1], [big, big, big, 0, 2]):
        updates, state = tx.update(jnp.array([1.0, -2.0, 0.0, 0.0, 3.0]), state)
        np.testing.assert_array_equal(np.asarray(state.coord_count), expected)  # never wraps to negative
        assert int(state.count) == big
        assert bool(jnp.all(jnp.isfinite(updates))) and bool(jnp.all(jnp.isfinite(state.nu)))
    assert float(updates[3]) == 0.0 and float(state.mu[3]) == 0.0 and float(state.nu[3]) == 0.0  # not started


def test_per_coordinate_steps_does_not_change_coordinates_with_history():
    grads = gradient_sequence(300, shapes=SHAPES, seed=11, dtype=torch.float32)  # Gaussian: no exact zeros
    params0 = initial_params(SHAPES, dtype=torch.float32)
    plain, plain_state = _run_optax_scanned(adamnx(1e-2), params0, grads, jnp.float32)
    per_coord, state = _run_optax_scanned(adamnx(1e-2, per_coordinate_steps=True), params0, grads, jnp.float32)
    for a, b, c in zip(plain, per_coord, state[0].coord_count):
        assert bool(jnp.all(c == 300))
        # the same counts and formulas; only the coefficients' evaluation differs (per element vs one scalar)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=0)
    assert isinstance(plain_state[0], ScaleByAdamNXState) and len(plain_state[0]) == 3


def test_per_coordinate_jit_compiles_once_and_inject_hyperparams_is_equivalent():
    grads = late_starting_gradients(40, SHAPES, dtype=torch.float32, seed=5)
    params0 = initial_params(SHAPES, dtype=torch.float32)
    hp = {"learning_rate": 3e-3, "b1": 0.8, "b2": 0.95, "weight_decay": 0.05, "per_coordinate_steps": True}
    params = [jnp.asarray(p.numpy()) for p in params0]
    tx = optax.inject_hyperparams(adamnx)(**hp)  # a bool is a static argument of inject_hyperparams
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step_grads in grads:
        updates, state = update([jnp.asarray(g.numpy()) for g in step_grads], state, params)
        params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1
    plain, _ = _run_optax(adamnx(**hp), params0, grads, jnp.float32)
    for a, b in zip(plain, params):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5)
    assert isinstance(state.inner_state[0], ScaleByAdamNXPerCoordinateState)


def test_per_coordinate_multisteps_none_leaves_and_mu_dtype():
    k = 4
    grads = [[g[1]] for g in late_starting_gradients(4 * k, SHAPES, dtype=torch.float32, seed=6)]
    params0 = initial_params([(7,)], dtype=torch.float32)
    tx = adamnx(1e-2, per_coordinate_steps=True)
    multi, _ = _run_optax(optax.MultiSteps(tx, every_k_schedule=k), params0, grads, jnp.float32)
    averaged = [[sum(g[0] for g in grads[i : i + k]) / k] for i in range(0, len(grads), k)]
    single, _ = _run_optax(tx, params0, averaged, jnp.float32)
    np.testing.assert_allclose(np.asarray(multi[0]), np.asarray(single[0]), rtol=1e-5, atol=1e-7)

    tx = scale_by_adamnx(mu_dtype=jnp.bfloat16, per_coordinate_steps=True)
    state = tx.init({"w": jnp.ones(3), "frozen": None})
    updates, state = jax.jit(tx.update)({"w": jnp.array([0.0, 1.0, 2.0]), "frozen": None}, state)
    assert updates["frozen"] is None and state.coord_count["frozen"] is None
    np.testing.assert_array_equal(np.asarray(state.coord_count["w"]), [0, 1, 1])
    assert state.mu["w"].dtype == jnp.bfloat16 and state.nu["w"].dtype == jnp.float32


def test_importing_adamnx_does_not_import_jax():
    code = (
        "import sys, adamnx, adamnx.functional, adamnx.optimizer; print('jax' in sys.modules, 'optax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_bench_jax_runs_train():
    from adamnx.bench.config import load_config
    from adamnx.bench.runner import train_one
    from adamnx.bench.tasks import get_task

    cfg = load_config("mnist1d", ["steps=30", "eval_every=15", "framework=jax", "hessian_iters=2"], quick=True)
    task = get_task("mnist1d")
    result = train_one(cfg, task, task.load(cfg), "adamnx", 0, framework="jax")
    assert len(result["evals"]) == 2 and result["evals"][-1]["val_loss"] < result["evals"][0]["val_loss"] * 1.5
    assert np.isfinite(result["hessian_top_eigenvalue"]) and result["constructor"].startswith("adamnx.optax.adamnx")
