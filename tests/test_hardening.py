"""The edges where a run could be corrupted silently: bad state dicts, steps that raise, edited param groups,
differentiable unrolls, flag combinations, and which kernel a test row runs."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import adamnx.backends
import adamnx.backends._pieces
import adamnx.update
from adamnx import AdamNX
from helpers import IMPLEMENTATIONS, rel_err, run_torch, takes_tensor_lr, without_options

# --------------------------------------------------------------------------- bad state dicts

SHAPES = {"a": (2, 3), "b": (4,), "c": (4,)}  # group 0 holds a and b, group 1 holds c


def _trained(impl: str, per_coordinate_steps: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    params = {name: torch.randn(shape, requires_grad=True) for name, shape in SHAPES.items()}
    groups = [
        {"params": [("a", params["a"]), ("b", params["b"])]},
        {"params": [("c", params["c"])], "lr": 3e-2, "weight_decay": 0.1},
    ]
    opt = IMPLEMENTATIONS[impl](groups, lr=1e-2, per_coordinate_steps=per_coordinate_steps)
    _steps(opt, list(params.values()), 2, seed)
    return opt, list(params.values())


def _steps(opt, params, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _snapshot(opt) -> tuple:
    """Everything a load could change, as plain values (bitwise tensor copies)."""
    state = [
        {k: (v.clone(), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups, [[id(p) for p in g["params"]] for g in opt.param_groups]


def _assert_same(before: tuple, after: tuple) -> None:
    (state_a, groups_a, ids_a), (state_b, groups_b, ids_b) = before, after
    assert groups_a == groups_b and ids_a == ids_b
    assert [sorted(s) for s in state_a] == [sorted(s) for s in state_b]
    for sa, sb in zip(state_a, state_b):
        for key, value in sa.items():
            if isinstance(value, tuple):
                assert sb[key][1] == value[1] and torch.equal(sb[key][0], value[0]), key
            else:
                assert sb[key] == value, key


def _state(sd, pid=0):
    return sd["state"][pid]


def _group(sd, i=0):
    return sd["param_groups"][i]


def _set(getter: Callable, **changes) -> Callable:
    return lambda sd: getter(sd).update(changes)


def _pop(getter: Callable, key) -> Callable:
    return lambda sd: getter(sd).pop(key)


@dataclass(frozen=True)
class _Replace:
    """A mutation that returns a whole new state dict (the others change it in place)."""

    new: Callable


def _apply(mutate, sd):
    if isinstance(mutate, _Replace):
        return mutate.new(sd)
    mutate(sd)
    return sd


def _finite_only_before_the_cast(sd):
    """float64 moments (say, from a float64 run) that overflow float32, the dtype they are loaded in."""
    _state(sd, 2)["exp_avg_sq"] = torch.tensor([1.0, 1e300, 0.0, 1.0], dtype=torch.float64)


def _json_round_trip(sd):
    sd["state"] = {str(k): v for k, v in sd["state"].items()}


def _names_as_ids(sd):
    """What torch.distributed.checkpoint's set_optimizer_state_dict hands load_state_dict: names, not ints."""
    names = {0: "a", 1: "b", 2: "c"}
    sd["state"] = {names[k]: v for k, v in sd["state"].items()}
    for group in sd["param_groups"]:
        group["params"] = [names[i] for i in group["params"]]


def _swap_group_params(sd):
    _group(sd)["param_names"] = ["b", "a"]


@dataclass(frozen=True)
class BadStateDict:
    desc: str
    mutate: Callable
    error_regex: str


BAD_STATE_DICTS = [
    # the container
    BadStateDict("not-a-dict", _Replace(lambda sd: [sd["state"], sd["param_groups"]]), "must be a dict"),
    BadStateDict("no-state", _pop(lambda sd: sd, "state"), "'state' dict and a 'param_groups' list"),
    BadStateDict("no-param-groups", _pop(lambda sd: sd, "param_groups"), "'state' dict and a 'param_groups' list"),
    BadStateDict("state-is-a-list", _set(lambda sd: sd, state=[]), "'state' dict"),
    BadStateDict("groups-a-tuple", lambda sd: sd.update(param_groups=tuple(sd["param_groups"])), "'param_groups' list"),
    # param groups: count, size, form
    BadStateDict("extra-group", lambda sd: sd["param_groups"].append(dict(_group(sd, 1))), "3 parameter groups"),
    BadStateDict("missing-group", lambda sd: sd["param_groups"].pop(), "1 parameter groups"),
    BadStateDict("group-one-id-more", lambda sd: _group(sd, 1)["params"].append(9), "group 1 .* has 2 parameters"),
    BadStateDict("group-one-id-fewer", lambda sd: _group(sd)["params"].pop(), "group 0 .* has 1 parameters"),
    BadStateDict("group-not-a-dict", lambda sd: sd["param_groups"].__setitem__(1, [2]), "group 1 .* must be a dict"),
    BadStateDict("group-without-params", _pop(_group, "params"), "group 0 .*'params' list"),
    BadStateDict("group-without-lr", _pop(_group, "lr"), r"group 0 .* is missing \['lr'\]"),
    BadStateDict("param-names-swapped", _swap_group_params, r"group 0 .* holds the parameters \['b', 'a'\]"),
    # param groups: hyperparameters, with the constructor's rules
    BadStateDict("lr-negative", _set(_group, lr=-1e-3), "group 0 .*Invalid learning rate: -0.001"),
    BadStateDict("lr-nan", _set(lambda sd: _group(sd, 1), lr=math.nan), "group 1 .*Invalid learning rate: nan"),
    BadStateDict("lr-string", _set(_group, lr="1e-3"), "group 0 .*lr must be a float"),
    BadStateDict("lr-tensor-2-elements", _set(_group, lr=torch.ones(2)), "group 0 .*(1-element|lr as a Tensor)"),
    BadStateDict("betas-single", _set(_group, betas=(0.9,)), "group 0 .*betas must be a pair"),
    BadStateDict("betas-not-a-pair", _set(_group, betas=0.9), "group 0 .*betas must be a pair"),
    BadStateDict("beta1-one", _set(_group, betas=(1.0, 0.99)), "group 0 .*index 0: 1.0"),
    BadStateDict("beta2-zero", _set(_group, betas=(0.9, 0.0)), "group 0 .*index 1: 0.0"),
    BadStateDict("beta2-string", _set(_group, betas=(0.9, "0.99")), "group 0 .*betas\\[1\\] must be a float"),
    BadStateDict("eps-negative", _set(_group, eps=-1e-8), "group 0 .*Invalid epsilon value"),
    BadStateDict("eps-none", _set(_group, eps=None), "group 0 .*eps must be a float"),
    BadStateDict("weight-decay-inf", _set(_group, weight_decay=math.inf), "group 0 .*Invalid weight_decay value: inf"),
    BadStateDict("fused-and-foreach", _set(_group, fused=True, foreach=True), "group 0 .*cannot be `True` together"),
    BadStateDict(
        "fused-differentiable",
        _set(_group, fused=True, foreach=None, differentiable=True),
        "group 0 .*`fused` does not",
    ),
    BadStateDict(
        "foreach-differentiable", _set(_group, foreach=True, differentiable=True, fused=None), "group 0 .*`foreach`"
    ),
    BadStateDict("state-dtype-int", _set(_group, state_dtype=torch.int32), "group 0 .*state_dtype must be"),
    BadStateDict("state-dtype-string", _set(_group, state_dtype="float32"), "group 0 .*state_dtype must be"),
    BadStateDict("maximize-string", _set(_group, maximize="no"), "group 0 .*maximize must be True or False"),
    # parameter ids and state keys
    BadStateDict("string-id-in-a-group", lambda sd: _group(sd)["params"].__setitem__(0, "0"), r"\[0\] that are not"),
    BadStateDict("float-ids", lambda sd: _group(sd)["params"].__setitem__(0, 0.0), "must be ints or names"),
    BadStateDict("bool-state-key", lambda sd: sd["state"].update({True: sd["state"].pop(1)}), r"\[True\] that are"),
    BadStateDict("duplicate-ids", lambda sd: _group(sd)["params"].__setitem__(1, 0), "more than once"),
    BadStateDict("state-keys-json-strings", _json_round_trip, r"\['0', '1', '2'\].*JSON"),
    BadStateDict("state-for-unknown-id", lambda sd: sd["state"].update({7: _state(sd)}), r"\[7\] that are not"),
    BadStateDict(
        "state-entry-not-a-dict", lambda sd: sd["state"].update({1: torch.zeros(4)}), "parameter 1 must be a dict"
    ),
    BadStateDict("missing-step", _pop(_state, "step"), r"parameter 0 is missing \['step'\]"),
    BadStateDict("missing-exp-avg", _pop(_state, "exp_avg"), r"parameter 0 is missing \['exp_avg'\]"),
    BadStateDict("unknown-state-key", _set(_state, max_exp_avg_sq=torch.zeros(2, 3)), "unknown entries"),
    # step
    BadStateDict("step-string", _set(_state, step="2"), "parameter 0: 'step' must be a number"),
    BadStateDict("step-list", _set(_state, step=[2]), "parameter 0: 'step' must be a number"),
    BadStateDict("step-none", _set(_state, step=None), "parameter 0: 'step' must be a number"),
    BadStateDict("step-bool", _set(_state, step=True), "parameter 0: 'step' must be a number"),
    BadStateDict("step-2-elements", _set(_state, step=torch.tensor([2.0, 2.0])), "'step' must be a number"),
    BadStateDict("step-nan", _set(_state, step=torch.tensor(math.nan)), "'step' must be a whole number"),
    BadStateDict("step-inf", _set(_state, step=math.inf), "'step' must be a whole number"),
    BadStateDict("step-negative", _set(_state, step=torch.tensor(-1.0)), "'step' must be a whole number"),
    BadStateDict("step-fraction", _set(_state, step=2.5), "'step' must be a whole number"),
    BadStateDict("step-past-2-pow-53", _set(_state, step=2.0**53 + 2), "'step' must be a whole number"),
    BadStateDict("int-step-past-2-pow-53", _set(_state, step=2**53 + 1), "'step' must be a whole number"),
    BadStateDict("step-meta", _set(_state, step=torch.tensor(2.0, device="meta")), "'step' must be a dense tensor"),
    BadStateDict("step-sparse", _set(_state, step=torch.tensor([2.0]).to_sparse()), "'step' must be a dense tensor"),
    BadStateDict(
        "lr-bool-tensor", _set(_group, lr=torch.tensor(True)), "group 0 .*(must hold a real number|lr as a Tensor)"
    ),
    # the moments
    BadStateDict("exp-avg-shape", _set(_state, exp_avg=torch.zeros(3, 2)), r"'exp_avg' has shape \(3, 2\)"),
    BadStateDict("exp-avg-flat", _set(_state, exp_avg=torch.zeros(6)), r"'exp_avg' has shape \(6,\)"),
    BadStateDict("exp-avg-list", _set(_state, exp_avg=[0.0] * 6), "'exp_avg' has shape list"),
    BadStateDict("exp-avg-complex", _set(_state, exp_avg=torch.zeros(2, 3, dtype=torch.cfloat)), "complex64"),
    BadStateDict("exp-avg-int", _set(_state, exp_avg=torch.zeros(2, 3, dtype=torch.int64)), "'exp_avg' is torch.int64"),
    BadStateDict("exp-avg-nan", _set(_state, exp_avg=torch.full((2, 3), math.nan)), "'exp_avg' holds inf or NaN"),
    BadStateDict("exp-avg-sq-inf", lambda sd: _state(sd, 2)["exp_avg_sq"].__setitem__(1, math.inf), "parameter 2"),
    BadStateDict("exp-avg-sq-negative", lambda sd: _state(sd)["exp_avg_sq"].__setitem__((0, 0), -1e-3), "negative"),
    BadStateDict("exp-avg-sparse", lambda sd: _state(sd, 1).update(exp_avg=torch.zeros(4).to_sparse()), "dense"),
    BadStateDict("exp-avg-meta", lambda sd: _state(sd, 1).update(exp_avg=torch.zeros(4, device="meta")), "dense"),
    BadStateDict(
        "exp-avg-nested",
        lambda sd: _state(sd, 1).update(
            exp_avg=torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], layout=torch.jagged)
        ),
        "parameter 1: 'exp_avg' must be a dense tensor",
    ),
    BadStateDict(
        "exp-avg-float8", lambda sd: _state(sd, 1).update(exp_avg=torch.zeros(4).to(torch.float8_e4m3fn)), "float8"
    ),
    BadStateDict(
        "exp-avg-sq-inf-once-cast", _finite_only_before_the_cast, "'exp_avg_sq' holds inf or NaN \\(as torch.float32\\)"
    ),
]

# Accepted on purpose, each with why it is harmless: the next steps equal those from the valid state dict.
HARMLESS_STATE_DICTS = [
    ("step-python-int", _set(_state, step=2)),  # the authors' implementation and older torch save Python steps
    ("step-float32-tensor", _set(_state, step=torch.tensor(2.0))),  # torch's loader casts to float32
    ("step-int64-tensor", _set(_state, step=torch.tensor(2))),
    ("exp-avg-float64", lambda sd: _state(sd).update(exp_avg=_state(sd)["exp_avg"].double())),  # cast back exactly
    ("older-group-without-new-options", lambda sd: [_group(sd).pop(k) for k in ("state_dtype", "skip_nonfinite")]),
    ("scheduler-keys-in-group", _set(_group, initial_lr=1e-2)),  # LR schedulers add these
    ("names-as-ids", _names_as_ids),
]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", BAD_STATE_DICTS, ids=lambda c: c.desc)
def test_bad_state_dict_is_refused_and_the_optimizer_is_intact(case, impl):
    opt, params = _trained(impl)
    twin = copy.deepcopy(opt)
    sd = _apply(case.mutate, copy.deepcopy(opt.state_dict()))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=case.error_regex):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))
    # and it trains on exactly as an untouched copy does
    _steps(opt, params, 2, seed=5)
    _steps(twin, [p for g in twin.param_groups for p in g["params"]], 2, seed=5)
    for p, q in zip(params, (p for g in twin.param_groups for p in g["params"])):
        assert torch.equal(p, q)


def test_the_bad_state_dict_table_is_big_enough():
    assert len(BAD_STATE_DICTS) >= 40 and len({c.desc for c in BAD_STATE_DICTS}) == len(BAD_STATE_DICTS)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize(("desc", "mutate"), HARMLESS_STATE_DICTS, ids=[d for d, _ in HARMLESS_STATE_DICTS])
def test_harmless_variants_load_and_train_like_the_valid_state_dict(desc, mutate, impl):
    opt, _ = _trained(impl)
    valid = copy.deepcopy(opt.state_dict())
    variant = copy.deepcopy(valid)
    mutate(variant)
    runs = []
    for sd in (valid, variant):
        fresh, fresh_params = _trained(impl, seed=1)  # other values: everything must come from the load
        fresh.load_state_dict(sd)
        _steps(fresh, fresh_params, 10, seed=7)
        runs.append((fresh, fresh_params))
    (a, a_params), (b, b_params) = runs
    for p, q in zip(a_params, b_params):
        assert torch.isfinite(q).all() and torch.equal(p, q)
        assert torch.equal(a.state[p]["step"], b.state[q]["step"]) and b.state[q]["step"].dtype == torch.float64


def test_an_empty_state_entry_means_no_state():
    opt, _ = _trained("for-loop")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2] = {}
    fresh, fresh_params = _trained("for-loop", seed=1)
    fresh.load_state_dict(sd)
    assert not fresh.state.get(fresh_params[2]) and fresh.state[fresh_params[0]]["step"].item() == 2


def test_a_bad_value_far_into_a_large_moment_is_found(monkeypatch):
    """The moments are scanned in pieces (no full-size mask at load); a NaN in the last piece still counts."""
    import adamnx._validation

    monkeypatch.setattr(adamnx._validation, "_SCAN_ELEMENTS", 4)
    opt, _ = _trained("for-loop")
    for key, value in (("exp_avg", math.nan), ("exp_avg_sq", -1.0)):
        sd = copy.deepcopy(opt.state_dict())
        sd["state"][0][key][1, 2] = value  # element 5 of 6: the second piece
        before = _snapshot(opt)
        with pytest.raises(ValueError, match=f"'{key}' holds"):
            opt.load_state_dict(sd)
        _assert_same(before, _snapshot(opt))


def test_moments_that_share_memory_load_as_separate_copies():
    """Harmless, so accepted: the load copies every moment, so one is never updated through the other."""
    opt, _ = _trained("for-loop")
    valid = copy.deepcopy(opt.state_dict())
    valid["state"][0]["exp_avg"] = valid["state"][0]["exp_avg_sq"].clone()
    shared = copy.deepcopy(valid)
    shared["state"][0]["exp_avg"] = shared["state"][0]["exp_avg_sq"]  # one tensor for both
    buffer = torch.cat([shared["state"][1]["exp_avg"], shared["state"][1]["exp_avg_sq"]])
    shared["state"][1]["exp_avg"], shared["state"][1]["exp_avg_sq"] = buffer[:4], buffer[4:]  # one storage
    runs = []
    for sd in (valid, shared):
        fresh, fresh_params = _trained("for-loop", seed=1)
        fresh.load_state_dict(sd)
        state = fresh.state[fresh_params[0]]
        assert state["exp_avg"].untyped_storage().data_ptr() != state["exp_avg_sq"].untyped_storage().data_ptr()
        _steps(fresh, fresh_params, 10, seed=7)
        runs.append(fresh_params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_loaded_state_is_a_copy_never_shared_with_the_source():
    """opt_b.load_state_dict(opt_a.state_dict()) must not make two optimizers step the same moment tensors."""
    a, a_params = _trained("for-loop")
    b, b_params = _trained("for-loop", seed=1)
    b.load_state_dict(a.state_dict())
    exp_avg_before = a.state[a_params[0]]["exp_avg"].clone()
    _steps(b, b_params, 1, seed=3)
    assert torch.equal(a.state[a_params[0]]["exp_avg"], exp_avg_before)


# --------------------------------------------------------------------------- coord_step: checked, and exact


BAD_COORD_STEPS = [
    ("shape", lambda c: c.reshape(-1)[:3], r"'coord_step' has shape \(3,\)"),
    ("negative", lambda c: c - 5, r"'coord_step' must lie in \[0, step"),
    ("above-step", lambda c: c + 1, r"'coord_step' must lie in \[0, step = 2\]"),
    ("fraction", lambda c: c.double() + 0.5, "'coord_step' must hold whole numbers"),
    ("nan", lambda c: torch.full(c.shape, math.nan), "'coord_step' must hold whole numbers"),
    ("bool", lambda c: c > 0, "'coord_step' must hold integer counts"),
    ("list", lambda c: c.tolist(), "'coord_step' has shape list"),
    ("sparse", lambda c: c.to_sparse(), "'coord_step' must be a dense tensor"),
    ("meta", lambda c: c.to("meta"), "'coord_step' must be a dense tensor"),
    ("float8", lambda c: c.float().to(torch.float8_e5m2), "'coord_step' must be a dense tensor"),
]


@pytest.mark.parametrize(("desc", "mutate", "regex"), BAD_COORD_STEPS, ids=[d for d, _, _ in BAD_COORD_STEPS])
def test_bad_coord_step_is_refused_and_the_optimizer_is_intact(desc, mutate, regex):
    opt, _ = _trained("for-loop", per_coordinate_steps=True)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["coord_step"] = mutate(sd["state"][0]["coord_step"])
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=regex):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_coord_step_survives_save_and_load_bitwise_for_every_param_dtype(dtype):
    """torch's loader casts state to the param's dtype: bf16 rounds 257 to 256, fp16 turns 70,000 into inf."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = AdamNX([p], per_coordinate_steps=True, state_dtype=torch.float32 if dtype != torch.float64 else None)
    p.grad = torch.ones(4, dtype=dtype)
    opt.step()
    counts = torch.tensor([0, 257, 70_000, 2**31 - 1], dtype=torch.int32)
    saved = opt.state_dict()
    saved["state"][0]["coord_step"], saved["state"][0]["step"] = counts, torch.tensor(2.0**31 - 1)
    for key in ("exp_avg", "exp_avg_sq"):  # the coordinate with count 0 has not started: its moments are 0
        saved["state"][0][key] = saved["state"][0][key].masked_fill(counts == 0, 0.0)
    opt.load_state_dict(saved)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = AdamNX([p], per_coordinate_steps=True, state_dtype=opt.param_groups[0]["state_dtype"])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    loaded = fresh.state_dict()["state"][0]["coord_step"]
    assert loaded.dtype == torch.int32 and torch.equal(loaded, counts)
    assert torch.equal(fresh.coord_steps(p), counts)


# --------------------------------------------------------------------------- a step that raises changes nothing


BAD_GROUP_EDITS = [
    ("lr-negative", {"lr": -1.0}, ValueError, "param group 1: Invalid learning rate"),
    ("lr-string", {"lr": "0.1"}, TypeError, "param group 1: lr must be a float"),
    ("beta1-one", {"betas": (1.0, 0.99)}, ValueError, "param group 1: Invalid beta parameter at index 0"),
    ("beta2-one", {"betas": (0.9, 1.0)}, ValueError, "param group 1: Invalid beta parameter at index 1"),
    ("betas-single", {"betas": (0.9,)}, ValueError, "param group 1: betas must be a pair"),
    ("eps-negative", {"eps": -1.0}, ValueError, "param group 1: Invalid epsilon value"),
    ("eps-string", {"eps": "tiny"}, TypeError, "param group 1: eps must be a float"),
    ("weight-decay-nan", {"weight_decay": math.nan}, ValueError, "param group 1: Invalid weight_decay value"),
    ("fused-and-foreach", {"fused": True, "foreach": True}, RuntimeError, "cannot be `True` together"),
    ("foreach-differentiable", {"foreach": True, "fused": None, "differentiable": True}, RuntimeError, "`foreach`"),
    ("state-dtype-int", {"state_dtype": torch.int8}, ValueError, "param group 1: state_dtype must be"),
    ("tensor-lr-foreach", {"lr": torch.tensor(0.1), "foreach": True, "fused": None, "capturable": False}, ValueError,
     "lr as a Tensor is not supported"),
    ("tensor-betas", {"betas": (torch.tensor(0.9), torch.tensor(0.99))}, TypeError, "betas must be Python floats"),
    ("lr-shape-1", {"lr": torch.tensor([0.1])}, ValueError, "param group 1: (Tensor lr must be 0-d|lr as a Tensor)"),
    ("weight-decay-shape-1", {"weight_decay": torch.tensor([0.01])}, ValueError, "Tensor weight_decay must be 0-d"),
    ("eps-shape-1", {"eps": torch.tensor([1e-8])}, ValueError, "param group 1: Tensor eps must be 0-d"),
    ("lr-bool", {"lr": torch.tensor(True), "foreach": False, "fused": None}, TypeError, "Tensor lr must be a real"),
    # in range, but not in float32 (the dtype of these params' update): the step would write inf or NaN
    ("lr-huge", {"lr": 1e300}, ValueError, r"param group 1: lr = 1e\+300 does not fit in torch.float32"),
    ("lr-huge-tensor", {"lr": torch.tensor(1e300, dtype=torch.float64), "foreach": False, "fused": None}, ValueError,
     r"lr = 1e\+300 does not fit"),
    ("eps-huge", {"eps": 1e39}, ValueError, r"param group 1: eps = 1e\+39 does not fit in torch.float32"),
    ("lr-times-weight-decay-huge", {"lr": 1e30, "weight_decay": 1e10}, ValueError, "lr \\* weight_decay = 1e\\+40"),
]  # fmt: skip


def test_a_float64_group_takes_a_learning_rate_float32_cannot_hold():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdamNX([p], lr=1e300, weight_decay=0.0)
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.isfinite(p).all() and p[0] < -1e299


def _resize(what: str):
    def edit(opt, p):
        if what == "param":
            p.data = torch.randn(p.numel() + 1)  # the model was rebuilt with a bigger layer
        elif what == "coord_lag":
            opt.state[p]["coord_lag"] = torch.zeros(3, dtype=torch.int32)
        else:  # a moment replaced by hand
            opt.state[p][what] = torch.zeros(p.numel() + 1)

    return edit


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("what", ["param", "exp_avg", "exp_avg_sq", "coord_lag"])
def test_a_resized_param_or_state_is_refused_before_anything_steps(impl, what):
    """The param of the second group (or its state) changes shape between steps: the step raises before the first
    group, or any counter, moves."""
    opt, params = _trained(impl, per_coordinate_steps=True)
    _resize(what)(opt, params[2])
    before = _snapshot(opt)
    values = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=f"has shape .*'{'exp_avg' if what == 'param' else what}'"):
        opt.step()
    _assert_same(before, _snapshot(opt))
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    del opt.state[params[2]]  # the remedy the message gives: that param starts over, the others go on
    opt.step()
    assert opt.state[params[2]]["step"] == 1 and opt.state[params[0]]["step"] == 3


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize(("desc", "edit", "error", "regex"), BAD_GROUP_EDITS, ids=[c[0] for c in BAD_GROUP_EDITS])
def test_a_step_that_raises_changes_nothing(desc, edit, error, regex, impl):
    """Bad hyperparameters set on the second group between steps: the step raises before any group changes."""
    opt, params = _trained(impl)
    opt.param_groups[1].update(edit)
    before = _snapshot(opt)
    values = [p.detach().clone() for p in params]
    for _ in range(2):  # a retry changes nothing either
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(error, match=regex):
            opt.step()
    _assert_same(before, _snapshot(opt))
    assert all(torch.equal(p, v) for p, v in zip(params, values))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_a_sparse_gradient_in_a_later_group_changes_nothing(impl):
    opt, params = _trained(impl)
    before = _snapshot(opt)
    for p in params[:2]:
        p.grad = torch.ones_like(p)
    params[2].grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    _assert_same(before, _snapshot(opt))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_the_functional_form_checks_betas_before_any_counter_advances(impl):
    p, g = torch.zeros(3), torch.ones(3)
    m, v, step = torch.zeros(3), torch.zeros(3), torch.tensor(4.0, dtype=torch.float64)
    flags = IMPLEMENTATIONS[impl].kwargs
    with pytest.raises(ValueError, match="index 1"):
        adamnx.functional.adamnx(
            [p], [g], [m], [v], [step], beta1=0.9, beta2=1.0, lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False,
            foreach=flags.get("foreach"), fused=flags.get("fused"), capturable=flags.get("capturable", False),
        )  # fmt: skip
    assert step.item() == 4.0 and not p.any() and not m.any()


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_a_broadcast_gradient_steps_like_a_dense_one(impl):
    """A gradient that is a broadcast view (stride 0: one value for every coordinate) is only read; a step never
    writes to it, so it steps as its dense copy does."""
    results = []
    for grad in (torch.tensor(0.5).expand(4, 8), torch.full((4, 8), 0.5)):
        p = torch.nn.Parameter(torch.ones(4, 8))
        opt = IMPLEMENTATIONS[impl]([p], lr=1e-2, per_coordinate_steps=True)
        for _ in range(2):
            p.grad = grad
            opt.step()
        results.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["step"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- differentiable unrolls


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_differentiable_three_step_unroll_passes_gradcheck(weight_decay):
    """Backpropagation through 3 steps whose gradients depend on the params (a meta-learning unroll)."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    noise = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def unroll(p0, noise):
        p = p0.clone()
        opt = AdamNX([p], lr=0.1, weight_decay=weight_decay, differentiable=True)
        for t in range(3):
            p.grad = 2.0 * p + noise[t]  # ∇ of ‖p‖² + noise·p: depends on the previous steps
            opt.step()
        return p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]

    assert torch.autograd.gradcheck(unroll, (p0, noise))
    # and the unrolled values are the ordinary for-loop's
    p, m, _ = unroll(p0, noise)
    q = p0.detach().clone().requires_grad_(True)
    opt = AdamNX([q], lr=0.1, weight_decay=weight_decay, foreach=False)
    for t in range(3):
        q.grad = 2.0 * q.detach() + noise[t].detach()
        opt.step()
    assert torch.allclose(p.detach(), q.detach(), rtol=1e-14, atol=0)
    assert torch.allclose(m.detach(), opt.state[q]["exp_avg"], rtol=1e-14, atol=0)


def test_differentiable_unroll_gives_a_gradient_to_a_tensor_lr():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(3, dtype=torch.float64, generator=g)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)

    def unroll(lr):
        p = p0.clone().requires_grad_(True).clone()
        opt = AdamNX([p], lr=lr, differentiable=True)
        for _ in range(2):
            p.grad = 2.0 * p + 0.3
            opt.step()
        return p

    assert torch.autograd.gradcheck(unroll, (lr,))


def test_differentiable_with_leaf_params_is_refused_before_anything_changes():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = AdamNX([a, b], differentiable=True)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(RuntimeError, match="non-leaf params"):
        opt.step()
    assert not opt.state and torch.equal(a.detach(), torch.ones(3))


# --------------------------------------------------------------------------- flag combinations


@pytest.mark.parametrize("flags", [{"foreach": True, "fused": True}, {"fused": True, "differentiable": True}])
def test_invalid_flag_combinations_raise_what_adamw_raises(flags):
    with pytest.raises(RuntimeError):
        torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], **flags)
    with pytest.raises(RuntimeError):
        AdamNX([torch.nn.Parameter(torch.ones(2))], **flags)


def test_tensor_lr_with_the_default_implementation_on_an_accelerator_falls_back_to_the_loop(monkeypatch):
    """torch's rule: where foreach is the default, a Tensor lr (not capturable) runs the for-loop instead."""
    monkeypatch.setattr(adamnx.backends, "_FOREACH_DEFAULT_DEVICES", ("cpu",))  # the CPU plays the accelerator
    used = []
    for name in ("for-loop", "foreach"):
        row = adamnx.backends.BACKENDS[name]
        recording = lambda plan, _f=row.execute, _n=name: (used.append(_n), _f(plan))  # noqa: E731
        monkeypatch.setitem(adamnx.backends.BACKENDS, name, dataclasses.replace(row, execute=recording))
    results = []
    for lr in (0.1, torch.tensor(0.1)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = AdamNX([p], lr=lr)
        for _ in range(3):
            p.grad = p.detach() * 3
            opt.step()
        results.append(p.detach())
    assert used == ["foreach"] * 3 + ["for-loop"] * 3
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_float64_params_with_float32_state_keep_float64(impl):
    """The math runs in the wider dtype: a zero gradient leaves a float64 param exactly where it was."""
    p = torch.nn.Parameter(torch.tensor([1.0 + 2.0**-40, -3.0 - 2.0**-45], dtype=torch.float64))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-2, weight_decay=0.0, state_dtype=torch.float32)
    start = p.detach().clone()
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert p.dtype == torch.float64 and torch.equal(p.detach(), start)
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_float64_params_with_float32_state_agree_on_every_path():
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(50, dtype=torch.float64, generator=g)
    grads = [torch.randn(50, dtype=torch.float64, generator=g) for _ in range(20)]
    finals = {}
    for impl in IMPLEMENTATIONS:
        p = p0.clone().requires_grad_(True)
        opt = IMPLEMENTATIONS[impl]([p], lr=1e-2, state_dtype=torch.float32)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        finals[impl] = p.detach()
    for impl, value in finals.items():
        assert rel_err(value, finals["for-loop"].numpy()) <= 1e-12, impl


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_params_compute_in_float32_on_every_path(impl, dtype):
    """fp16 rounds eps = 1e-8 to 0: a zero gradient would give 0/0 = NaN without float32 math."""
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=dtype))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -1.0, 2.0], dtype=dtype))
    # and a real step is the float32 step on upcast copies, rounded once
    g = torch.Generator().manual_seed(1)
    p.grad = torch.randn(3, generator=g).to(dtype)
    wide = torch.nn.Parameter(p.detach().float())
    wide_opt = AdamNX([wide], lr=1e-2, weight_decay=0.0, foreach=False)
    wide_opt.load_state_dict(without_options(opt.state_dict()))  # moments cast up exactly, for the plain for-loop
    wide.grad = p.grad.float()
    opt.step()
    wide_opt.step()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one unit in the last place, relative
    torch.testing.assert_close(p.detach().float(), wide.detach().to(dtype).float(), rtol=ulp, atol=0)
    v, wide_v = opt.state[p]["exp_avg_sq"], wide_opt.state[wide]["exp_avg_sq"].to(dtype)
    torch.testing.assert_close(v.float(), wide_v.float(), rtol=ulp, atol=0)


@pytest.mark.parametrize("impl", [impl for impl in IMPLEMENTATIONS if takes_tensor_lr(impl)])
def test_float32_tensor_lr_and_weight_decay_on_float64_params_lose_no_precision(impl):
    """lr·λ is formed in the math dtype (float64 here), not in the float32 of the 0-d tensors."""
    lr_t, wd_t = torch.tensor(1e-2), torch.tensor(0.3)
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(20, dtype=torch.float64, generator=g)
    grads = [torch.randn(20, dtype=torch.float64, generator=g) for _ in range(30)]
    runs = []
    for lr, wd in ((lr_t, wd_t), (float(lr_t), float(wd_t))):  # the same float32 values, as Python floats
        p = p0.clone().requires_grad_(True)
        opt = IMPLEMENTATIONS[impl]([p], lr=lr, weight_decay=wd)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        runs.append(p.detach())
    assert rel_err(runs[0], runs[1].numpy()) <= 1e-15


def test_float32_tensor_lr_on_float64_params_under_torch_compile_loses_no_precision():
    lr_t = torch.tensor(1e-2)
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(20, dtype=torch.float64, generator=g)
    grads = [torch.randn(20, dtype=torch.float64, generator=g) for _ in range(5)]
    runs = []
    for lr, compiled in ((lr_t, True), (float(lr_t), False)):
        p = p0.clone().requires_grad_(True)
        opt = AdamNX([p], lr=lr, weight_decay=0.3, foreach=False)
        step = torch.compile(opt.step) if compiled else opt.step
        for grad in grads:
            p.grad = grad.clone()
            step()
        runs.append(p.detach())
    assert rel_err(runs[0], runs[1].numpy()) <= 1e-15


# --------------------------------------------------------------------------- the implementation table


def test_an_implementation_row_cannot_be_spread_into_the_constructor():
    with pytest.raises(TypeError):
        AdamNX([torch.nn.Parameter(torch.ones(2))], **IMPLEMENTATIONS["fused-inductor"])


def test_each_fused_row_runs_its_own_kernel(monkeypatch):
    from adamnx.backends import BACKENDS

    calls = []
    for name, label in (("fused", "C++"), ("fused-inductor", "inductor")):
        fake = dataclasses.replace(BACKENDS[name], execute=lambda plan, _label=label: calls.append(_label))
        monkeypatch.setitem(BACKENDS, name, fake)
    for impl in ("fused", "fused-inductor", "fused"):
        p = torch.nn.Parameter(torch.ones(3))
        opt = IMPLEMENTATIONS[impl]([p])
        p.grad = torch.ones(3)
        opt.step()
    assert calls == ["C++", "inductor", "C++"]  # and the switch does not outlive the step


def test_a_param_appended_to_a_checked_fused_group_is_checked_too():
    a, m = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = AdamNX([{"params": [a], "fused": True}, {"params": [m], "foreach": False}])
    a.grad, m.grad = torch.ones(3), torch.ones(3, device="meta")
    opt.step()  # m gets state in a non-fused group; group 0 passes fused's checks
    opt.param_groups[0]["params"].append(m)
    del opt.param_groups[1]
    with pytest.raises(RuntimeError, match="fused=True supports"):
        opt.step()


# --------------------------------------------------------------------------- lr as a tensor


def test_a_one_element_lr_tensor_becomes_0_d_and_steps_on_every_path():
    for impl in [impl for impl in IMPLEMENTATIONS if takes_tensor_lr(impl)]:
        lr = torch.tensor([1e-2])
        p = torch.nn.Parameter(torch.ones(3))
        opt = IMPLEMENTATIONS[impl]([p], lr=lr)
        p.grad = torch.ones(3)
        opt.step()
        assert opt.param_groups[0]["lr"].dim() == 0 and p.detach()[0].item() == pytest.approx(1 - 1e-2 * 1.01, rel=1e-5)
        lr.fill_(0.0)  # a scheduler that fills the user's tensor still sets the group's lr (a view)
        p.grad = torch.ones(3)
        before = p.detach().clone()
        opt.step()
        assert torch.equal(p.detach(), before), impl


def test_a_one_element_lr_from_a_checkpoint_becomes_0_d():
    """torch's AdamW accepts lr = tensor([0.01]); a checkpoint with it loads into a group that can step."""
    opt, params = _trained("capturable")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = torch.tensor([0.01], dtype=torch.float64)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"].dim() == 0
    _steps(opt, params, 2, seed=3)
    assert all(torch.isfinite(p).all() for p in params)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wider_math_in_pieces_equals_the_whole_tensor_update(impl, dtype, monkeypatch):
    """Low-precision params are updated in float32 pieces (bounded temporaries, where the executor cuts them):
    bitwise the whole-tensor result."""
    shapes = [(7, 5), (3,), (11,), (2, 2, 2)]
    g = torch.Generator().manual_seed(4)
    params0 = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(5)]
    results = []
    # bf16 moments tile a step's random bits with a period that divides every piece size (as the real ones do)
    monkeypatch.setattr(adamnx.update, "NOISE_PERIOD", 4)
    for piece in (1 << 20, 4):
        monkeypatch.setattr(adamnx.backends._pieces, "_PIECE", {"cpu": piece})
        for coords in (False, True):
            torch.manual_seed(0)  # bf16 moments round stochastically: the same draws, cut in pieces or not
            params = [p.clone().requires_grad_(True) for p in params0]
            opt = IMPLEMENTATIONS[impl](params, lr=1e-2, per_coordinate_steps=coords)
            for step in grads:
                for p, gr in zip(params, step):
                    p.grad = gr.clone()
                opt.step()
            results.append([(p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in params])
    half = len(results) // 2
    for whole, pieces in zip(results[:half], results[half:]):
        for a, b in zip(whole, pieces):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_bf16_params_with_float64_state_and_stochastic_rounding(impl):
    """float64 math, then stochastic rounding to bf16 (through float32): every path steps, unbiased."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.full((20_000,), 4.0, dtype=torch.bfloat16))
    opt = IMPLEMENTATIONS[impl]([p], lr=1e-3, weight_decay=0.0, state_dtype=torch.float64, stochastic_rounding=True)
    for _ in range(10):
        p.grad = torch.ones_like(p)
        opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64
    assert p.detach().float().mean().item() == pytest.approx(4.0 - 10 * 1e-3, abs=2e-3)  # nearest would stay at 4


# --------------------------------------------------------------------------- load hooks and param names


def test_load_pre_hooks_run_before_the_checks_and_post_hooks_after_the_exact_restore():
    opt, params = _trained("for-loop")
    legacy = copy.deepcopy(opt.state_dict())
    for state in legacy["state"].values():  # a layout that only a pre-hook understands
        state["m"], state["v"] = state.pop("exp_avg"), state.pop("exp_avg_sq")

    def upgrade(optimizer, sd):
        for state in sd["state"].values():
            state["exp_avg"], state["exp_avg_sq"] = state.pop("m"), state.pop("v")

    def reset_first_moment(optimizer):
        optimizer.state[params[0]]["exp_avg"].zero_()

    opt.register_load_state_dict_pre_hook(upgrade)
    opt.register_load_state_dict_post_hook(reset_first_moment)
    expected_v = opt.state[params[0]]["exp_avg_sq"].clone()
    opt.load_state_dict(legacy)
    assert torch.equal(opt.state[params[0]]["exp_avg_sq"], expected_v)
    assert not opt.state[params[0]]["exp_avg"].any()  # the post-hook's change stands


def test_param_names_from_a_wrapped_model_still_load():
    """DDP's "module." and torch.compile's "_orig_mod." prefixes rename params without reordering them."""
    model = torch.nn.Linear(3, 2)
    opt = AdamNX(model.named_parameters())
    model.weight.grad, model.bias.grad = torch.ones(2, 3), torch.ones(2)
    opt.step()
    wrapped = AdamNX(torch.nn.Sequential(model).named_parameters())
    wrapped.load_state_dict(opt.state_dict())
    assert wrapped.state[model.weight]["step"].item() == 1


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "per_coordinate_steps"])
def test_torch_compile_fullgraph_still_compiles_the_step(guarded):
    """With the guard too, from the state-creating first step (it read the new state's step: data-dependent)."""
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = AdamNX(params, lr=1e-2, foreach=False, per_coordinate_steps=guarded)
    step = torch.compile(opt.step, fullgraph=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    assert opt.state[params[0]]["step"].item() == 3
    if guarded:
        assert opt.coord_steps(params[0]).eq(3).all()


# --------------------------------------------------------------------------- kernels that cannot be built


def test_switching_fused_on_without_a_compiler_changes_nothing(monkeypatch):
    from adamnx.backends import _cpu_extension

    opt, params = _trained("for-loop")

    def no_compiler():
        raise _cpu_extension.CompilerNotFoundError("no C++ compiler was found")

    monkeypatch.setattr(_cpu_extension, "load", no_compiler)
    opt.param_groups[1]["fused"] = True  # a group whose params already have state
    before = _snapshot(opt)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        opt.step()
    _assert_same(before, _snapshot(opt))


def test_a_fused_kernel_that_cannot_compile_finishes_the_step_eagerly(monkeypatch):
    """fused=True on an accelerator without Triton: raising would leave earlier tensors, dtypes and groups stepped
    and later ones not; the step finishes with the same function run eagerly, with one warning."""
    from adamnx.backends import fused_inductor

    def no_triton(*key):
        def kernel(*args):
            raise RuntimeError("Cannot find a working triton installation")

        return kernel

    calls = []
    monkeypatch.setattr(fused_inductor, "_compiled_chunk", lambda *key: calls.append(key) or no_triton(*key))
    monkeypatch.setattr(fused_inductor, "_UNCOMPILABLE", set())
    fused_inductor._warn_eager_fallback_once.cache_clear()
    shapes = [(6,), (1,), (3, 4)]  # the 1-element one runs eagerly anyway
    g = torch.Generator().manual_seed(0)
    params0 = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(3)]
    with pytest.warns(UserWarning, match="could not compile.*triton.*runs eagerly") as record:
        fused, opt = run_torch(params0, grads, impl="fused-inductor", lr=1e-2)
    assert len(record) == 1 and len(calls) == 1  # once, not once per step: no second attempt to compile
    loop, _ = run_torch(params0, grads, impl="for-loop", lr=1e-2)
    for p, q in zip(fused, loop):
        assert rel_err(p, q.detach().numpy()) <= 1e-12
    assert all(opt.state[p]["step"].item() == 3 for p in fused)


# --------------------------------------------------------------------------- what a load keeps, and other optimizers'


def test_a_load_keeps_the_optimizers_options_and_names_the_differences():
    """fp16 params whose optimizer asks for float32 moments, and a checkpoint saved without: the moments load in
    float32 (exactly), with a warning naming both values; the checkpoint's hyperparameters are taken."""
    p = torch.nn.Parameter(torch.randn(4, 3).half())
    saved_by = AdamNX([p], lr=3e-2, fused=True)
    p.grad = torch.randn(4, 3).half()
    saved_by.step()
    opt = AdamNX([p], lr=1e-3, state_dtype=torch.float32)
    with pytest.warns(
        UserWarning, match=r"fused \(checkpoint: True, kept: None\).*state_dtype \(checkpoint: None, kept"
    ):
        opt.load_state_dict(saved_by.state_dict())
    group, state = opt.param_groups[0], opt.state[p]
    assert group["state_dtype"] == torch.float32 and group["fused"] is None and group["lr"] == 3e-2
    assert state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["exp_avg_sq"], saved_by.state[p]["exp_avg_sq"].float())


def test_moments_the_kept_state_dtype_cannot_hold_are_refused():
    """A float32 checkpoint into fp16 moments: v ≈ 1e-10 would round to 0 and the next update be hundreds of times
    too large. Refused, with the remedy, and nothing changes."""
    p = torch.nn.Parameter(torch.ones(3).half())
    opt = AdamNX([p])
    p.grad = torch.ones(3).half()
    opt.step()
    wide = torch.nn.Parameter(torch.ones(3))
    source = AdamNX([wide])
    wide.grad = torch.full((3,), 1e-5)  # v = g² = 1e-10: below fp16's smallest value
    source.step()
    before = _snapshot(opt)
    with pytest.raises(
        ValueError, match=r"'exp_avg_sq' holds non-zero values that are 0 in torch.float16.*state_dtype"
    ):
        opt.load_state_dict(without_options(source.state_dict()))
    _assert_same(before, _snapshot(opt))


def _adamw_trained(cls=torch.optim.AdamW, steps: int = 50, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = cls(model.parameters(), lr=1e-3, **kwargs)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()  # the gradient of the next step
    return model, opt


def test_a_torch_adamw_checkpoint_is_refused_without_conversion():
    model, adamw = _adamw_trained()
    opt = AdamNX(model.parameters())
    with pytest.raises(ValueError, match=r"saved by torch.optim.Adam or AdamW.*from_optimizer='adamw'"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state


@pytest.mark.parametrize(("cls", "name", "kwargs"), [(torch.optim.AdamW, "adamw", {"weight_decay": 0.01}),
                                                       (torch.optim.Adam, "adam", {})])  # fmt: skip
def test_a_torch_adam_checkpoint_converts_and_the_first_update_is_close_to_its_own(cls, name, kwargs):
    """AdamW's moments are not bias-corrected; converted, AdamNX's first update on the same gradient is within a few
    percent of the update AdamW would have made (the same lr, betas and weight decay)."""
    model, theirs = _adamw_trained(cls, **kwargs)
    ours_model = copy.deepcopy(model)
    ours = AdamNX(ours_model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=kwargs.get("weight_decay", 0.0))
    ours.load_state_dict(theirs.state_dict(), from_optimizer=name)
    for p, q in zip(model.parameters(), ours_model.parameters()):
        q.grad = p.grad.clone()
    before = [p.detach().clone() for p in model.parameters()]
    theirs.step()
    ours.step()
    for p, q, b in zip(model.parameters(), ours_model.parameters(), before):
        their_update, our_update = p.detach() - b, q.detach() - b
        assert (our_update - their_update).norm() <= 0.01 * their_update.norm()  # seen: 2e-4 (unconverted: 3.1)
    assert ours.state[next(ours_model.parameters())]["step"].item() == 51  # the count goes on


def test_conversion_refuses_what_it_cannot_convert():
    model, amsgrad = _adamw_trained(amsgrad=True, steps=3)
    opt = AdamNX(model.parameters())
    with pytest.raises(ValueError, match="AMSGrad"):
        opt.load_state_dict(amsgrad.state_dict(), from_optimizer="adamw")
    with pytest.raises(ValueError, match="from_optimizer must be 'adam' or 'adamw'"):
        opt.load_state_dict(amsgrad.state_dict(), from_optimizer="sgd")
    p = next(model.parameters())
    with pytest.raises(ValueError, match=r"takes a state dict saved by torch\.optim\.AdamW"):
        opt.load_state_dict(AdamNX(model.parameters()).state_dict(), from_optimizer="adamw")
    assert not opt.state and p.grad is not None


def test_the_period_of_shared_random_bits_divides_every_piece_size():
    """A tensor cut in pieces draws the bits it draws whole only if every piece starts at a multiple of the period."""
    from adamnx.backends._pieces import _ACCELERATOR_PIECE, _PIECE

    for size in (*_PIECE.values(), _ACCELERATOR_PIECE):
        assert size % adamnx.update.NOISE_PERIOD == 0
