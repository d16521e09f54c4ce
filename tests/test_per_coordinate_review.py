"""Adversarial review of 36b5e90 (what is known of a tensor's counts): each test here failed on that commit.

Every test compares a run with the fast paths against the same run with nothing recognised (the per-element path,
forced as in test_per_coordinate._per_element_only)."""

from __future__ import annotations

import time

import pytest
import torch

import adamnx._fused
import adamnx._tensors as tensors_module
from adamnx import AdamNX

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "per_coordinate_steps": True}


def _per_element_only(monkeypatch):
    unknown = tensors_module.KnownCounts(tensors_module.BY_ELEMENT)
    for module in (tensors_module, adamnx._fused):
        monkeypatch.setattr(module, "observe_counts", lambda count, step: unknown)
    for module in (tensors_module, adamnx._fused):
        monkeypatch.setattr(module, "off_step_coordinates", lambda count, step: None)


def _both(run, monkeypatch):
    fast = run()
    with monkeypatch.context() as patch:
        _per_element_only(patch)
        slow = run()
    return fast, slow


def _assert_same(fast, slow):
    for i, (x, y) in enumerate(zip(fast, slow)):
        assert torch.equal(x, y), f"tensor {i} differs"


def _state(opt, params, keys=("coord_step", "exp_avg")):
    return [p.detach().clone() for p in params] + [opt.state[p][k].clone() for p in params for k in keys]


# --------------------------------------------------------------------------- 1. fused steps keep stale BY_ROW
@pytest.mark.parametrize("fused_impl", ["fused", "fused-inductor"])
def test_by_row_knowledge_survives_a_fused_step_that_breaks_the_rows(fused_impl, monkeypatch):
    """for-loop notes BY_ROW; a fused step (group["fused"] switched on) walks the counts per element while a row
    starts with a zero inside it, yet re-notes the old BY_ROW; the for-loop then advances whole rows from their
    first count. Cause: _cpu_step / _compiled_step re-note ``known`` unchanged after a kernel that walked counts."""

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
            opt.param_groups[0]["fused"] = t == 6  # one fused step, for-loop otherwise
            p.grad = gr
            if t == 6 and fused_impl == "fused-inductor":
                with adamnx._fused.inductor_on_cpu():
                    opt.step()
            else:
                opt.step()
        return _state(opt, [p])

    _assert_same(*_both(run, monkeypatch))


# --------------------------------------------------------------------------- 2. inductor: skipped first step
def test_inductor_first_step_skipped_by_found_inf_is_noted_on_step(monkeypatch):
    """GradScaler's usual first step (found_inf = 1 at step 0) with fused=True on an accelerator: _compiled_step
    notes the all-zero counts as ON_STEP at step 0; step 1 walks them (coordinates with a zero first gradient stay 0)
    but keeps ON_STEP without exceptions, and from step 2 on every count is advanced as if started. Cause: the
    known kind is re-noted after a walk, and ON_STEP is noted at step 0."""

    def run():
        g = torch.Generator().manual_seed(0)
        p = torch.randn(64, 64, generator=g).requires_grad_()
        opt = AdamNX([p], fused=True, **HYPER)
        opt.grad_scale = torch.ones(())
        with adamnx._fused.inductor_on_cpu():
            for t in range(6):
                gr = torch.randn(64, 64, generator=g)
                if t < 4:
                    gr[0, :5] = 0.0  # five coordinates start at step 4
                opt.found_inf = torch.ones(()) if t == 0 else torch.zeros(())
                p.grad = gr
                opt.step()
        return _state(opt, [p])

    fast, slow = _both(run, monkeypatch)
    assert slow[1][0, :5].tolist() == [2] * 5  # started at step 4 (counts 1, 2): the per-element path is right
    _assert_same(fast, slow)


# --------------------------------------------------------------------------- 3. .data assignment is not seen
@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_counts_replaced_through_data_are_looked_at_again(impl, monkeypatch):
    """``state["coord_step"].data = new`` keeps the tensor (the WeakIdKeyDictionary key) and its version counter:
    the new values are taken for the old (ON_STEP, no exceptions) knowledge. Cause: _version does not change on
    .data assignment (set_data keeps the version counter)."""

    def run():
        g = torch.Generator().manual_seed(0)
        p = torch.randn(64, 64, generator=g).requires_grad_()
        opt = AdamNX([p], **impl, **HYPER)
        for t in range(1, 9):
            p.grad = torch.randn(64, 64, generator=g)
            if t == 5:  # restart one coordinate, through .data
                state = opt.state[p]
                counts = state["coord_step"].clone()
                counts[0, 0] = 0
                state["coord_step"].data = counts
                state["exp_avg"][0, 0] = state["exp_avg_sq"][0, 0] = 0.0
            opt.step()
        return _state(opt, [p])

    _assert_same(*_both(run, monkeypatch))


# --------------------------------------------------------------------------- 5. slower than per element
def _ms_per_step(impl, shapes, zero, steps=20):
    torch.manual_seed(0)
    params = [torch.randn(s).requires_grad_() for s in shapes]
    opt = AdamNX(params, lr=1e-3, per_coordinate_steps=True, **impl)
    for p in params:
        p.grad = torch.randn(p.shape)
        zero(p.grad)
    for _ in range(3):
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps * 1e3


def _one_dead(g):
    g.view(-1)[0] = 0.0  # one coordinate never starts: ON_STEP with one exception


def _dead_rows(g):
    g[::5] = 0.0  # every fifth row never starts: BY_ROW
