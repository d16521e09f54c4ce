"""The torch.optim contract: errors, checkpoints, closures, hooks, copies, and the implementation choice."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from adamnx import AdamNX
from adamnx.reference import AdamNXReference
from helpers import (
    IMPLEMENTATIONS,
    ErrorOptimizerInput,
    assert_matches_reference,
    gradient_sequence,
    initial_params,
    run_reference,
)


def _param():
    return torch.nn.Parameter(torch.randn(3))


ERROR_INPUTS = [
    ErrorOptimizerInput({"lr": -1e-2}, ValueError, "Invalid learning rate: -0.01"),
    ErrorOptimizerInput({"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
    ErrorOptimizerInput({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element"),
    ErrorOptimizerInput({"lr": "0.1"}, TypeError, "lr must be a float"),
    ErrorOptimizerInput({"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
    ErrorOptimizerInput({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    ErrorOptimizerInput({"betas": (1.0, 0.99)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
    ErrorOptimizerInput({"betas": (-0.1, 0.99)}, ValueError, "Invalid beta parameter at index 0: -0.1"),
    ErrorOptimizerInput({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
    ErrorOptimizerInput({"betas": (0.9, 0.0)}, ValueError, "index 1: 0.0 .*v freezes at g_1"),
    ErrorOptimizerInput({"betas": (0.9,)}, ValueError, "betas must be a pair"),
    # Flag combinations raise RuntimeError with torch.optim's words: code written for AdamW, and PyTorch's own
    # test_errors (these two regexes are the error_regex of torch/testing/_internal/common_optimizers.py), match them.
    ErrorOptimizerInput(
        {"foreach": True, "fused": True}, RuntimeError, "`fused` and `foreach` cannot be `True` together"
    ),
    ErrorOptimizerInput(
        {"fused": True, "differentiable": True}, RuntimeError, "`fused` does not support `differentiable`"
    ),
    ErrorOptimizerInput({"foreach": True, "differentiable": True}, RuntimeError, "`foreach` does not support"),
    ErrorOptimizerInput({"maximize": "yes"}, TypeError, "maximize must be True or False"),
    ErrorOptimizerInput({"fused": 1}, TypeError, "fused must be True, False or None"),
    ErrorOptimizerInput({"eps": float("inf")}, ValueError, "Invalid epsilon value: inf"),
    ErrorOptimizerInput({"weight_decay": float("nan")}, ValueError, "Invalid weight_decay value: nan"),
    ErrorOptimizerInput(
        {"lr": torch.tensor(1e-3), "foreach": True}, ValueError, "lr as a Tensor is not supported for capturable=False"
    ),
]


@pytest.mark.parametrize("case", ERROR_INPUTS, ids=lambda c: c.error_regex[:40])
def test_invalid_constructor_arguments_raise_clear_errors(case):
    with pytest.raises(case.error_type, match=case.error_regex):
        AdamNX([_param()], **case.kwargs)


@pytest.mark.parametrize("case", ERROR_INPUTS[:10], ids=lambda c: c.error_regex[:40])
def test_invalid_param_group_is_rejected_without_changing_the_optimizer(case):
    opt = AdamNX([_param()])
    with pytest.raises(case.error_type, match=case.error_regex):
        opt.add_param_group({"params": [_param()], **case.kwargs})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = AdamNX(emb.parameters())
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_fused_rejects_unsupported_device_or_dtype_before_state_exists():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    p.grad = torch.zeros(3, dtype=torch.int64)
    opt = AdamNX([p], fused=True)
    with pytest.raises(RuntimeError, match="fused=True supports floating-point params"):
        opt.step()
    assert len(opt.state) == 0


def test_closure_is_called_exactly_once_and_its_loss_returned():
    p = _param()
    opt = AdamNX([p])
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)


def test_params_without_grad_are_skipped():
    a, b = _param(), _param()
    a.grad = torch.ones(3)
    before = b.detach().clone()
    opt = AdamNX([a, b])
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), before)


def test_named_parameters_are_recorded_in_the_state_dict():
    model = torch.nn.Linear(2, 2)
    opt = AdamNX(model.named_parameters())
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_step_hooks_run():
    p = _param()
    p.grad = torch.ones(3)
    opt = AdamNX([p])
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.step()
    assert seen == ["pre", "post"]


def test_deepcopy_is_independent_and_equal():
    p = _param()
    p.grad = torch.ones(3)
    opt = AdamNX([p])
    opt.step()
    clone = copy.deepcopy(opt)
    state, cloned = opt.state[p], next(iter(clone.state.values()))
    for key in state:
        assert torch.equal(state[key], cloned[key]) and state[key].data_ptr() != cloned[key].data_ptr()


def test_repr_names_the_optimizer_and_its_hyperparameters():
    text = repr(AdamNX([_param()], lr=3e-4))
    assert text.startswith("AdamNX (") and "lr: 0.0003" in text and "betas: (0.9, 0.99)" in text


def test_defaults_are_the_authors():
    group = AdamNX([_param()]).param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.99), 1e-8, 0.01)


def test_tensor_betas_are_accepted_as_floats():
    opt = AdamNX([_param()], betas=(torch.tensor(0.8), torch.tensor(0.95)))
    assert opt.param_groups[0]["betas"] == (pytest.approx(0.8), pytest.approx(0.95))


def test_foreach_default_follows_torch_cpu_uses_the_loop(monkeypatch):
    import dataclasses

    from adamnx.backends import BACKENDS

    chosen = []
    for name, label in (("for-loop", "loop"), ("foreach", "foreach")):
        fake = dataclasses.replace(BACKENDS[name], execute=lambda plan, _label=label: chosen.append(_label))
        monkeypatch.setitem(BACKENDS, name, fake)
    p = _param()
    p.grad = torch.ones(3)
    AdamNX([p]).step()
    AdamNX([p], foreach=True).step()
    assert chosen == ["loop", "foreach"]


# --------------------------------------------------------------------------- checkpoints


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_state_dict_round_trip_continues_bitwise(impl):
    straight = _model()
    opt = IMPLEMENTATIONS[impl](straight.parameters(), lr=1e-2)
    _train(straight, opt, 10, seed=1)
    _train(straight, opt, 10, seed=2)

    first = _model()
    opt1 = IMPLEMENTATIONS[impl](first.parameters(), lr=1e-2)
    _train(first, opt1, 10, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2 = IMPLEMENTATIONS[impl](resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, 10, seed=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for p in resumed.parameters():
        assert opt2.state[p]["step"].dtype == torch.float64


def test_old_state_dict_without_newer_keys_loads():
    model = _model()
    opt = AdamNX(model.parameters(), lr=1e-2)
    _train(model, opt, 3, seed=1)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable", "fused"):
            group.pop(key)
    fresh = AdamNX(model.parameters(), lr=1e-2)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["maximize"] is False and fresh.param_groups[0]["fused"] is None
    _train(model, fresh, 2, seed=2)


def _authors_state_dict(step: float, shapes, seed=0):
    """A state dict as the authors' implementation saves it: float32 step, only their four hyperparameters."""
    g = torch.Generator().manual_seed(seed)
    state = {
        i: {
            "step": torch.tensor(step, dtype=torch.float32),
            "exp_avg": torch.randn(s, generator=g, dtype=torch.float64),
            "exp_avg_sq": torch.rand(s, generator=g, dtype=torch.float64),
        }
        for i, s in enumerate(shapes)
    }
    group = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01, "params": list(range(len(shapes)))}
    return {"state": state, "param_groups": [group]}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_authors_state_dict_loads_and_continues_like_the_reference(impl):
    shapes = [(3, 2), (4,)]
    sd = _authors_state_dict(40.0, shapes)
    params0 = initial_params(shapes)
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = IMPLEMENTATIONS[impl](params)
    opt.load_state_dict(sd)
    ref = AdamNXReference([p.numpy() for p in params0], lr=1e-2)
    ref.m = [s["exp_avg"].numpy().copy() for s in sd["state"].values()]
    ref.v = [s["exp_avg_sq"].numpy().copy() for s in sd["state"].values()]
    ref.t = [40, 40]
    grads = gradient_sequence(25, shapes=shapes, seed=3)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
        ref.step([gr.numpy() for gr in step_grads])
    assert_matches_reference(params, opt, ref, tol=1e-12)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("saved_step", [torch.tensor(2.0**24, dtype=torch.float32), 2**24, 2.0**24])
def test_float32_or_python_step_keeps_counting_past_2_pow_24(impl, saved_step):
    sd = _authors_state_dict(0.0, [(2,)])
    sd["state"][0]["step"] = saved_step
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = IMPLEMENTATIONS[impl]([p])
    opt.load_state_dict(sd)
    for _ in range(3):
        p.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    step = opt.state[p]["step"]
    assert step.dtype == torch.float64 and step.item() == 2**24 + 3


def test_capturable_load_keeps_float64_step_exact():
    """torch's loader casts 'step' to float32 for capturable groups; ours keeps the exact count."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = AdamNX([p], capturable=True)
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(2.0**24 + 1, dtype=torch.float64)
    fresh = AdamNX([p], capturable=True)
    fresh.load_state_dict(sd)
    assert fresh.state[p]["step"].item() == 2**24 + 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "parameter groups"),
        (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(5)), "shape"),
        (lambda sd: sd["state"][0].pop("exp_avg_sq"), "missing"),
        (lambda sd: sd["state"][0].update(exp_avg=torch.zeros(2, 3, dtype=torch.complex64)), "complex"),
        (lambda sd: sd["param_groups"][0]["params"].append(99), "doesn't match the size"),
        (lambda sd: sd.pop("state"), "'state'"),
    ],
    ids=["group-count", "shape", "missing-key", "dtype", "group-size", "no-state"],
)
def test_bad_state_dict_raises_and_leaves_the_optimizer_untouched(mutate, message):
    p = torch.nn.Parameter(torch.randn(2, 3))
    p.grad = torch.ones(2, 3)
    opt = AdamNX([p])
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"] + 1
    mutate(sd)
    with pytest.raises(ValueError, match=re.escape(message) if message != "complex" else "complex|shape|dtype"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    assert after["param_groups"] == before["param_groups"]


def test_reference_matches_itself_run_in_parts():
    """The driver used everywhere: a sanity check that the reference is deterministic and per-parameter."""
    grads = gradient_sequence(20)
    params0 = initial_params()
    a = run_reference(params0, grads)
    b = run_reference(params0, grads[:10])
    for step_grads in grads[10:]:
        b.step([g.numpy() for g in step_grads])
    for x, y in zip(a.theta, b.theta):
        assert (x == y).all()
