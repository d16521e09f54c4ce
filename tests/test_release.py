"""Gradient release (adamnx.release_gradients): each param stepped in the backward pass, its gradient freed.

Parity with the ordinary loop on every implementation, checkpoints both ways, LR schedulers, accumulation, and the
refusals of what needs every gradient at once. (DDP's refusal: tests/test_distributed.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adamnx
from adamnx import AdamNX, release_gradients
from helpers import IMPLEMENTATIONS

STEPS = 5


class Net(nn.Module):
    """Dense layers, an embedding whose rows start late (the guard), a frozen layer and a bias-free layer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(8, 3, bias=False)
        self.to(dtype)

    def forward(self, tokens):
        return self.out(torch.tanh(self.frozen(torch.tanh(self.hidden(self.embed(tokens))))))


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, min(10, 4 + step), (5,), generator=g)  # rows 4.. get their first gradient late
    return tokens, torch.randn(5, 3, generator=g)


def _loss(model, step, scale=1.0):
    tokens, target = _batch(step)
    return (model(tokens).float() - target).pow(2).mean() * scale


def _plain(model, opt, steps, start=0, accumulation=1, scheduler=None):
    for step in range(start, start + steps):
        opt.zero_grad()
        for micro in range(accumulation):
            _loss(model, step * accumulation + micro, 1.0 / accumulation).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _released(model, opt, steps, start=0, accumulation=1, scheduler=None):
    for step in range(start, start + steps):
        for micro in range(accumulation):
            _loss(model, step * accumulation + micro, 1.0 / accumulation).backward()
        opt.step()  # a no-op: existing loops run unchanged
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _assert_same(model_a, opt_a, model_b, opt_b, exact=True):
    """Bitwise; ``exact=False``: to float32 rounding (the compiled accelerator kernel, whose code for one tensor
    at a time is another specialisation than for a chunk of several, and rounds a last bit otherwise)."""
    tolerance = {} if exact else {"rtol": 1e-6, "atol": 1e-7}
    close = torch.equal if exact else (lambda a, b: torch.allclose(a.double(), b.double(), **tolerance))
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert close(a, b), name
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for key, state in sd_a["state"].items():
        for name, value in state.items():
            assert close(value, sd_b["state"][key][name]), (key, name)


def _pair(impl, dtype=torch.float32, **kwargs):
    plain_model = Net(dtype)
    released_model = copy.deepcopy(plain_model)
    make = IMPLEMENTATIONS[impl]
    return (plain_model, make(plain_model.parameters(), lr=1e-2, **kwargs)), (
        released_model,
        make(released_model.parameters(), lr=1e-2, **kwargs),
    )


# --------------------------------------------------------------------------- the same bits as the ordinary loop


@pytest.mark.parametrize("guard", [False, True], ids=["", "guard"])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_every_implementation_gives_the_ordinary_loops_bits(impl, guard):
    (plain_model, plain_opt), (model, opt) = _pair(impl, per_coordinate_steps=guard)
    _plain(plain_model, plain_opt, STEPS)
    with release_gradients(opt) as release:
        _released(model, opt, STEPS)
    assert release.step_calls == STEPS
    assert all(p.grad is None for p in model.parameters())  # every gradient freed after its step
    _assert_same(plain_model, plain_opt, model, opt, exact=not impl.startswith("fused-inductor"))
    assert not model.frozen.weight.grad and model.frozen.weight not in opt.state  # frozen: never stepped


@pytest.mark.parametrize("impl", ["for-loop", "fused"])
def test_bf16_params_and_float32_state(impl):
    (plain_model, plain_opt), (model, opt) = _pair(impl, torch.bfloat16, state_dtype=torch.float32)
    _plain(plain_model, plain_opt, STEPS)
    with release_gradients(opt):
        _released(model, opt, STEPS)
    _assert_same(plain_model, plain_opt, model, opt)


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
def test_accumulation_sums_the_gradients_of_several_backward_passes(impl):
    (plain_model, plain_opt), (model, opt) = _pair(impl)
    _plain(plain_model, plain_opt, STEPS, accumulation=3)
    with release_gradients(opt, accumulation_steps=3):
        _released(model, opt, STEPS, accumulation=3)
    torch.testing.assert_close(list(model.parameters()), list(plain_model.parameters()), rtol=1e-6, atol=1e-7)
    assert {int(s["step"]) for s in opt.state.values()} == {STEPS}


def test_an_lr_scheduler_drives_the_released_optimizer():
    (plain_model, plain_opt), (model, opt) = _pair("fused")
    plain_scheduler = torch.optim.lr_scheduler.LambdaLR(plain_opt, lambda step: 0.5**step)
    _plain(plain_model, plain_opt, STEPS, scheduler=plain_scheduler)
    release = release_gradients(opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    _released(model, opt, STEPS, scheduler=scheduler)
    release.remove()
    assert opt.param_groups[0]["lr"] == plain_opt.param_groups[0]["lr"] == 1e-2 * 0.5**STEPS
    _assert_same(plain_model, plain_opt, model, opt)


def test_without_step_calls_and_with_a_scheduler_no_order_warning(recwarn):
    """A loop that never calls opt.step() (the backward pass steps): the scheduler does not warn about its order."""
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2)
    release = release_gradients(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        _loss(model, step).backward()
        scheduler.step()
    release.remove()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert {int(s["step"]) for s in opt.state.values()} == {3}


def test_a_closure_runs_its_backward_pass_once_and_returns_the_loss():
    """Lightning's step(closure): the closure's backward pass steps the params; step() adds nothing."""
    (plain_model, plain_opt), (model, opt) = _pair("foreach")
    _plain(plain_model, plain_opt, 1)
    calls = []

    def closure():
        calls.append(1)
        loss = _loss(model, 0)
        loss.backward()
        return loss

    with release_gradients(opt):
        loss = opt.step(closure)
    assert len(calls) == 1 and loss.item() > 0
    _assert_same(plain_model, plain_opt, model, opt)


def test_add_param_group_is_released_too():
    model = Net()
    opt = AdamNX([model.hidden.weight], lr=1e-2)
    with release_gradients(opt):
        opt.add_param_group({"params": [model.out.weight], "lr": 1e-3})
        _loss(model, 0).backward()
    assert model.out.weight.grad is None and int(opt.state[model.out.weight]["step"]) == 1
    assert model.hidden.bias.grad is not None  # not the optimizer's: left alone


# --------------------------------------------------------------------------- checkpoints, both ways


@pytest.mark.parametrize("impl", ["for-loop", "foreach", "fused"])
@pytest.mark.parametrize("first_released", [True, False], ids=["released-then-plain", "plain-then-released"])
def test_a_checkpoint_moves_between_release_and_a_plain_loop(impl, first_released):
    (plain_model, plain_opt), (model, opt) = _pair(impl, per_coordinate_steps=True)
    _plain(plain_model, plain_opt, 2 * STEPS)
    if first_released:
        with release_gradients(opt):
            _released(model, opt, STEPS)
    else:
        _plain(model, opt, STEPS)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0].keys() == plain_opt.state_dict()["param_groups"][0].keys()  # the usual format
    resumed = IMPLEMENTATIONS[impl](model.parameters(), lr=1e-2, per_coordinate_steps=True)
    resumed.load_state_dict(saved)
    if first_released:
        _plain(model, resumed, STEPS, start=STEPS)
    else:
        with release_gradients(resumed):
            _released(model, resumed, STEPS, start=STEPS)
    _assert_same(plain_model, plain_opt, model, resumed)


@pytest.mark.filterwarnings("ignore::UserWarning")  # DCP in one process without a process group says so
@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_a_distributed_checkpoint_restart_while_released_loads_the_state(flatten, tmp_path):
    """torch.distributed.checkpoint creates state with a step (lr = 0, zero gradients) to build the template a load
    fills; while released step() stepped nothing, so the template was empty and the restart silently loaded no
    optimizer state. The restart now continues as the uninterrupted run, bitwise, counts and all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    (plain_model, plain_opt), (model, opt) = _pair("fused", per_coordinate_steps=True)
    _plain(plain_model, plain_opt, 2 * STEPS)
    with release_gradients(opt):
        _released(model, opt, STEPS)
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=tmp_path)
    restarted = copy.deepcopy(model)
    resumed = IMPLEMENTATIONS["fused"](restarted.parameters(), lr=1e-2, per_coordinate_steps=True)
    with release_gradients(resumed):  # on before the load, as a training script turns it on
        template = {"optim": get_optimizer_state_dict(restarted, resumed, options=options)}
        assert all(int(state["step"]) == 0 for state in resumed.state.values())  # created, nothing counted
        dcp.load(template, checkpoint_id=tmp_path)
        set_optimizer_state_dict(restarted, resumed, template["optim"], options=options)
        assert all(p.grad is None for p in restarted.parameters())
        _released(restarted, resumed, STEPS, start=STEPS)
    _assert_same(plain_model, plain_opt, restarted, resumed)


def test_a_step_call_inside_an_accumulation_cycle_creates_no_state():
    """lr = 0 (a warm-up) and a gradient that is exactly 0 after the first micro-batch (a LoRA A while B = 0) look like
    torch.distributed.checkpoint's state-creating step; inside a cycle they are a partial gradient, and step() there
    stays a no-op: the param's state is not created early, so the end of the cycle is the fake-step-free t = 1 the
    plain loop has (it counted a step the plain loop does not)."""
    torch.manual_seed(0)
    a0, b0 = torch.randn(4, 8) * 0.3, torch.zeros(8, 4)

    def loss(a, b, t):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(t))
        return ((x @ a.T) @ b.T - x).pow(2).mean()

    def run(released):
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        opt = AdamNX([a, b], lr=0.0, foreach=True)
        release = release_gradients(opt, accumulation_steps=2) if released else None
        for cycle in range(4):
            opt.param_groups[0]["lr"] = 0.0 if cycle == 0 else 1e-2
            for micro in range(2):
                loss(a, b, 2 * cycle + micro).backward()
                if released:
                    opt.step()  # after every micro-batch: a no-op inside the cycle
            if not released:
                opt.step()
            opt.zero_grad()
        if release is not None:
            release.remove()
        return [a, b], opt

    (plain, plain_opt), (ours, opt) = run(False), run(True)
    assert [int(plain_opt.state[p]["step"]) for p in plain] == [3, 4]  # a's lr = 0 zero-gradient step: not counted
    for p, q in zip(ours, plain):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["step"], plain_opt.state[q]["step"])


def test_a_load_while_released_keeps_the_release():
    (plain_model, plain_opt), (model, opt) = _pair("fused")
    _plain(plain_model, plain_opt, 2)
    with release_gradients(opt):
        _released(model, opt, 1)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new group objects: the hooks find theirs
        _released(model, opt, 1, start=1)
    _assert_same(plain_model, plain_opt, model, opt)


def test_remove_restores_the_ordinary_optimizer():
    (plain_model, plain_opt), (model, opt) = _pair("for-loop")
    _plain(plain_model, plain_opt, 2)
    release = release_gradients(opt)
    _released(model, opt, 1)
    release.remove()
    release.remove()  # twice: harmless
    _loss(model, 1).backward()
    assert model.hidden.weight.grad is not None  # no longer stepped in the backward pass
    opt.step()
    _assert_same(plain_model, plain_opt, model, opt)
    assert copy.deepcopy(opt)._gradient_release is None


# --------------------------------------------------------------------------- refused


def _untouched(model, opt, before_params, before_state):
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before_params))
    assert opt.state_dict()["state"].keys() == before_state.keys()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"differentiable": True}, "differentiable=True"),
        ({"skip_nonfinite": True}, "skip_nonfinite=True"),
    ],
)
def test_options_that_need_every_gradient_are_refused_and_nothing_is_hooked(kwargs, message):
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2, **kwargs)
    with pytest.raises(RuntimeError, match=message):
        release_gradients(opt)
    _loss(model, 0).backward()
    assert model.hidden.weight.grad is not None and not opt.state  # no hook stepped anything
    assert opt._gradient_release is None


def test_bad_arguments_are_refused():
    model = Net()
    with pytest.raises(TypeError, match=r"adamnx\.AdamNX"):
        release_gradients(torch.optim.AdamW(model.parameters()))  # type: ignore[arg-type]
    opt = AdamNX(model.parameters())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="accumulation_steps"):
            release_gradients(opt, accumulation_steps=bad)
    with release_gradients(opt), pytest.raises(RuntimeError, match="released already"):
        release_gradients(opt)


def test_grad_scaler_is_refused_with_a_clear_message():
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    with release_gradients(opt):
        scaler.scale(_loss(model, 0)).backward()
        with pytest.raises(RuntimeError, match="GradScaler cannot drive"):
            scaler.step(opt)


def test_backward_passes_beyond_the_accumulation_are_refused_before_a_second_step():
    """Accumulating by hand (two backward passes per opt.step()) would step each param twice: refused at the
    first param of the second pass, before it is stepped again."""
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2)
    with release_gradients(opt):
        _released(model, opt, 1)
        _loss(model, 1).backward()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RuntimeError, match="accumulation_steps"):
            _loss(model, 2).backward()
        stepped_twice = [not torch.equal(a, b) for a, b in zip(model.parameters(), before)]
    assert not any(stepped_twice)
    assert {int(s["step"]) for s in opt.state.values()} == {2}


def test_a_bad_hyperparameter_is_refused_before_the_param_changes():
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2)
    with release_gradients(opt):
        _released(model, opt, 1)
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        opt.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="learning rate"):
            _loss(model, 1).backward()
    _untouched(model, opt, before, state)
    assert all(int(s["step"]) == 1 for s in opt.state.values())


@pytest.mark.slow
def test_a_compiled_model_releases_its_gradients():
    (plain_model, plain_opt), (model, opt) = _pair("fused")
    _plain(plain_model, plain_opt, 3)
    compiled = torch.compile(model)
    with release_gradients(opt):
        _released(compiled, opt, 3)
    torch.testing.assert_close(list(model.parameters()), list(plain_model.parameters()), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_the_public_names():
    assert adamnx.release_gradients is release_gradients
    assert adamnx.GradientRelease.__module__ == "adamnx.release"


def test_gradients_left_by_a_plain_loop_are_dropped_and_accumulating_ones_kept():
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2)
    _plain(model, opt, 1)  # leaves its gradients (already stepped)
    assert model.hidden.weight.grad is not None
    with release_gradients(opt, accumulation_steps=2):
        assert all(p.grad is None for p in model.parameters())  # not summed into the next backward pass
        _loss(model, 1).backward()
        opt.zero_grad()  # a half-accumulated gradient stays
        assert model.hidden.weight.grad is not None and int(opt.state[model.hidden.weight]["step"]) == 1
        _loss(model, 2).backward()
        assert model.hidden.weight.grad is None and int(opt.state[model.hidden.weight]["step"]) == 2


# --------------------------------------------------------------------------- found in review


class Experts(nn.Module):
    """A layer that only some micro-batches use (a mixture-of-experts expert, a conditional head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b):
        return self.b(self.a(x)) if use_b else self.a(x)


@pytest.mark.parametrize("impl", ["for-loop", "fused"])
def test_accumulation_steps_a_param_once_per_cycle_whatever_micro_batches_use_it(impl):
    uses = [True, False, False, False, True, True, False, True]  # b is used by some micro-batches only

    def loss(model, i):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(i))
        return model(x, uses[i]).pow(2).mean() / 2

    plain_model, model = Experts(), Experts()
    plain_opt, opt = IMPLEMENTATIONS[impl](plain_model.parameters()), IMPLEMENTATIONS[impl](model.parameters())
    for step in range(4):
        plain_opt.zero_grad()
        for micro in range(2):
            loss(plain_model, 2 * step + micro).backward()
        plain_opt.step()
    with release_gradients(opt, accumulation_steps=2):
        for step in range(4):
            for micro in range(2):
                loss(model, 2 * step + micro).backward()
            opt.step()
            opt.zero_grad()
    assert int(opt.state[model.b.weight]["step"]) == int(plain_opt.state[plain_model.b.weight]["step"]) == 3
    _assert_same(plain_model, plain_opt, model, opt)


def test_a_param_unfrozen_after_the_release_started_is_trained():
    def run(release: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        model[0].requires_grad_(False)
        opt = AdamNX(model.parameters(), lr=1e-2)
        handle = release_gradients(opt) if release else None
        model[0].requires_grad_(True)  # progressive unfreezing
        for i in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
            opt.step()
        if handle is not None:
            assert all(p.grad is None for p in model.parameters())
            handle.remove()
        return model, opt

    _assert_same(*run(False), *run(True))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_without_reentrancy_and_reentrant_refused(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Looped(nn.Module):  # one layer applied three times, each application checkpointed
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.shared, self.out = nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            for _ in range(3):
                x = checkpoint(lambda y: torch.tanh(self.shared(y)), x, use_reentrant=reentrant)
            return self.out(x)

    x = torch.randn(8, 4, requires_grad=True)
    plain_model, model = Looped(), Looped()
    plain_opt, opt = AdamNX(plain_model.parameters()), AdamNX(model.parameters())
    plain_model(x).pow(2).mean().backward()
    plain_opt.step()
    with release_gradients(opt):
        if reentrant:  # each segment would be a backward pass of its own: shared.weight stepped 3 times
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                model(x).pow(2).mean().backward()
            assert model.shared.weight not in opt.state  # refused before its first step
            return
        model(x).pow(2).mean().backward()
    _assert_same(plain_model, plain_opt, model, opt)


def test_after_a_refused_step_no_gradient_of_that_pass_is_kept():
    (plain_model, plain_opt), (model, opt) = _pair("for-loop")
    _plain(plain_model, plain_opt, 1)
    _plain(plain_model, plain_opt, 1, start=2)  # the refused pass's batch (1) is never stepped
    with release_gradients(opt):
        opt.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="learning rate"):
            _loss(model, 0).backward()
        opt.param_groups[0]["lr"] = 1e-2
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        _released(model, opt, 1)
        opt.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="learning rate"):
            _loss(model, 1).backward()
        opt.param_groups[0]["lr"] = 1e-2
        opt.zero_grad()
        _released(model, opt, 1, start=2)
    _assert_same(plain_model, plain_opt, model, opt)


def test_refused_options_in_a_new_or_edited_group_are_refused_too():
    model = Net()
    opt = AdamNX([model.hidden.weight], lr=1e-2)
    with release_gradients(opt):
        with pytest.raises(RuntimeError, match="skip_nonfinite=True"):
            opt.add_param_group({"params": [model.out.weight], "skip_nonfinite": True})
        assert len(opt.param_groups) == 1  # not added
        opt.param_groups[0]["differentiable"] = True
        with pytest.raises(RuntimeError, match="differentiable=True"):
            _loss(model, 0).backward()
        assert not opt.state  # refused before anything stepped


def test_after_grad_scaler_was_refused_the_optimizer_still_works():
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    release = release_gradients(opt)
    scaler.scale(_loss(model, 0)).backward()
    with pytest.raises(RuntimeError, match="already changed"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    _released(model, opt, 1, start=1)  # released, without a scaler
    release.remove()
    _plain(model, opt, 1, start=2)
    assert {int(s["step"]) for s in opt.state.values()} == {3}


def test_distributed_initialised_after_the_release_is_refused_at_the_next_backward(monkeypatch):
    model = Net()
    opt = AdamNX(model.parameters(), lr=1e-2)
    with release_gradients(opt):
        monkeypatch.setattr(adamnx.release, "_processes", lambda: 2)
        with pytest.raises(RuntimeError, match="DDP"):
            _loss(model, 0).backward()
    assert not opt.state


def test_one_param_is_released_by_one_optimizer():
    model = Net()
    first, second = AdamNX(model.parameters()), AdamNX(model.out.parameters())
    with release_gradients(first), pytest.raises(RuntimeError, match="another optimizer"):
        release_gradients(second)
    with release_gradients(second):  # once the first is removed
        _loss(model, 0).backward()
    assert int(second.state[model.out.weight]["step"]) == 1
