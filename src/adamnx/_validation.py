"""Checks on what a user hands the optimizer: hyperparameters and state dicts. Nothing here changes anything.

Every check raises before the optimizer is touched, so a refused input leaves it bitwise as it was. The
hyperparameter rules are the constructor's, applied again to every param group a state dict brings and, cheaply
(no host sync), to every group at each step; the state-dict rules run once per load, never in ``step``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from adamnx import quantized
from adamnx._dtensor import check_placed_like, local_part
from adamnx.backends import FLOATING_DTYPES, rows_for
from adamnx.guard import MAX_COUNT

__all__ = ["FLOATING_DTYPES", "KEPT_ON_LOAD", "as_float", "check_hyperparameters", "check_state_dict"]

# Options a group may lack (older checkpoints, the authors' implementation) and the value it then gets.
OPTION_DEFAULTS = {
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "state_dtype": None,
    "stochastic_rounding": False,
    "skip_nonfinite": False,
    "per_coordinate_steps": False,
}
# Options that say how this process steps (implementation, storage, precision, guards), not what the run computes:
# a load keeps the optimizer's own (what its constructor asked for), and warns where a checkpoint's differ.
KEPT_ON_LOAD = (
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "state_dtype",
    "stochastic_rounding",
    "skip_nonfinite",
    "per_coordinate_steps",
)
_BOOL_OPTIONS = (
    "maximize",
    "capturable",
    "differentiable",
    "stochastic_rounding",
    "skip_nonfinite",
    "per_coordinate_steps",
)
_OPTIONAL_BOOL_OPTIONS = ("foreach", "fused")
# What to do with a full (unsharded) state dict for an FSDP2 model: torch's loader shards it like the live state.
_UNSHARDED = (
    "load a full state dict with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict(model, opt, "
    "state_dict, options=StateDictOptions(full_state_dict=True)), which shards it like the parameters"
)
_MOMENT_DTYPES = (*FLOATING_DTYPES, torch.complex64, torch.complex128)
_FLOAT8 = tuple(getattr(torch, name) for name in dir(torch) if name.startswith("float8_"))
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
OPTIONAL_STATE_KEYS = ("coord_step",)
MAX_STEP = 2**53  # float64 counts every integer up to here exactly
MAX_COORD_STEP = MAX_COUNT  # coord_step is int32


def as_float(value: Any, name: str) -> float:
    """Accept a Python number or a 1-element tensor (as torch.optim does) and return a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"Tensor {name} must hold a real number, got {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _checked_number(value: Any, name: str, read_tensors: bool) -> float | None:
    """``value`` as a float; None for a tensor when ``read_tensors`` is False (reading it would sync the host)."""
    if isinstance(value, Tensor) and not read_tensors:
        if value.dim() != 0:  # the constructor makes a 1-element lr 0-d, and eps and weight_decay floats
            raise ValueError(f"Tensor {name} must be 0-d when the step runs, got shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"Tensor {name} must be a real number, got {value.dtype}")
        return None
    return as_float(value, name)


def check_hyperparameters(group: Mapping[str, Any], *, read_tensors: bool = True) -> None:
    """The constructor's rules for one param group: ranges, types and flag combinations.

    ``read_tensors=False`` (at each step) checks tensor hyperparameters' shape and type but not their value, so
    that a capturable step on a device never waits for the host. Flag combinations raise RuntimeError, as
    torch.optim.AdamW does, so code written for AdamW catches them.
    """
    for key in _BOOL_OPTIONS:
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{key} must be True or False, got {group[key]!r}")
    for key in _OPTIONAL_BOOL_OPTIONS:
        if group.get(key) is not None and not isinstance(group[key], bool):
            raise TypeError(f"{key} must be True, False or None, got {group[key]!r}")
    lr = group["lr"]
    if isinstance(lr, Tensor) and group.get("foreach") and not group.get("capturable"):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    for key, label in (("lr", "learning rate"), ("eps", "epsilon value"), ("weight_decay", "weight_decay value")):
        value = _checked_number(group[key], key, read_tensors)
        if value is not None and not 0.0 <= value < math.inf:
            raise ValueError(f"Invalid {label}: {value}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if not read_tensors and any(isinstance(b, Tensor) for b in betas):  # the constructor makes them floats
        raise TypeError(f"betas must be Python floats when the step runs, got {betas!r}")
    beta1, beta2 = (_checked_number(b, f"betas[{i}]", read_tensors) for i, b in enumerate(betas))
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if beta2 is not None and not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if beta2 == 0.0:
        raise ValueError(
            "Invalid beta parameter at index 1: 0.0 (with beta2 = 0, v freezes at g_1^2 forever; use 0 < beta2 < 1)"
        )
    if group.get("fused"):
        if group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if group.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
    if group.get("foreach") and group.get("differentiable"):
        raise RuntimeError("`foreach` does not support `differentiable`")
    state_dtype = group.get("state_dtype")
    # The moments' dtypes that every implementation the flags may run can keep (each row's state_dtypes).
    if state_dtype is not None and any(
        state_dtype not in b.state_dtypes for b in rows_for(group.get("fused"), group.get("foreach"))
    ):
        raise ValueError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
    if group.get("differentiable") and (state_dtype is not None or group.get("stochastic_rounding")):
        raise RuntimeError("`differentiable=True` does not support state_dtype or stochastic_rounding")


# --------------------------------------------------------------------------- state dicts


def check_state_dict(
    state_dict: Any, param_groups: list[dict[str, Any]], keeps_8bit: Callable[[Tensor], bool] | None = None
) -> None:
    """Refuse, with a ValueError naming the group or parameter and the field, any state dict that would not load
    into ``param_groups`` as a valid AdamNX state: every check runs before the caller changes anything.
    ``keeps_8bit``: which params the optimizer keeps 8-bit moments for (their float moments are loaded in float32,
    then quantized)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a dict with 'state' and 'param_groups', got {type(state_dict).__name__}")
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
        raise ValueError("state_dict must have a 'state' dict and a 'param_groups' list")
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(param_groups)}"
        )
    ids: list[Any] = []
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        _check_saved_group(i, saved, group)
        ids.extend(saved["params"])
    for pid in ids:  # ints from state_dict(), names (str) from torch.distributed.checkpoint
        if isinstance(pid, bool) or not isinstance(pid, (int, str)):
            raise ValueError(f"loaded param_groups name parameter {pid!r}: parameter ids must be ints or names")
    if len(set(ids)) != len(ids):
        raise ValueError("loaded param_groups name a parameter id more than once")
    known = set(ids)
    # (True == 1 and 1.0 == 1 as dict keys: only ints and strs are ids)
    unknown = [
        key for key in saved_state if not isinstance(key, (int, str)) or isinstance(key, bool) or key not in known
    ]
    if unknown:
        json = any(isinstance(k, str) for k in unknown) and all(isinstance(i, int) for i in ids)
        hint = " (string keys for int ids: was it converted to JSON and back?)" if json else ""
        raise ValueError(
            f"loaded state has entries {unknown[:5]!r} that are not parameter ids of its param_groups{hint}; "
            "loading it would silently drop those moments and restart their training at t = 1"
        )
    for saved, group in zip(saved_groups, param_groups):
        state_dtype = group.get("state_dtype")  # the optimizer's own (KEPT_ON_LOAD): what the moments are loaded in
        for pid, param in zip(saved["params"], group["params"]):
            p_state = saved_state.get(pid)
            if p_state is None:
                continue
            if not isinstance(p_state, Mapping):
                raise ValueError(f"state of parameter {pid} must be a dict, got {type(p_state).__name__}")
            if p_state:
                target = param.dtype if state_dtype is None or param.is_complex() else state_dtype
                if keeps_8bit is not None and keeps_8bit(param):
                    target = torch.float32
                _check_param_state(pid, param, p_state, target)


def _check_saved_group(index: int, saved: Any, group: dict[str, Any]) -> None:
    where = f"param group {index} of the loaded state dict"
    if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
        raise ValueError(f"{where} must be a dict with a 'params' list of parameter ids")
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(
            f"loaded state dict contains a parameter group that doesn't match the size of optimizer's group: "
            f"{where} has {len(saved['params'])} parameters, the optimizer's {len(group['params'])}"
        )
    missing = [key for key in ("lr", "betas", "eps", "weight_decay") if key not in saved]
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    if "amsgrad" in saved:  # torch.optim.Adam's or AdamW's (every version saves it): biased moments
        raise ValueError(
            f"{where} was saved by torch.optim.Adam or AdamW (it has 'amsgrad'): their moments are not bias-corrected, "
            "and taken as AdamNX's the next update would be several times AdamW's. To switch a run from AdamW to "
            "AdamNX, convert it: opt.load_state_dict(state_dict, from_optimizer='adamw') (or 'adam')"
        )
    kept = {key: group[key] for key in KEPT_ON_LOAD if key in group}
    try:  # the group as saved, and as it will be: the checkpoint's hyperparameters with the optimizer's own options
        check_hyperparameters({**OPTION_DEFAULTS, **saved})
        check_hyperparameters({**OPTION_DEFAULTS, **saved, **kept})
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    # The same names in another order: the parameters were reordered, and each state would land on another one.
    # (Other names are no evidence: wrappers such as DDP's "module." or torch.compile's "_orig_mod." rename them.)
    saved_names, names = saved.get("param_names"), group.get("param_names")
    if saved_names is None or names is None:
        return
    if list(saved_names) != list(names) and sorted(map(str, saved_names)) == sorted(map(str, names)):
        raise ValueError(f"{where} holds the parameters {list(saved_names)}, the optimizer's group {list(names)}")


def _check_param_state(pid: Any, param: Tensor, p_state: Mapping[str, Any], target: torch.dtype) -> None:
    """One parameter's saved state; ``target``: the dtype its moments will be loaded in (and must be finite in).

    Moments that share memory are accepted: the load copies them, so they never alias afterwards."""
    where = f"state of parameter {pid}"
    eight_bit = quantized.is_quantized_state(p_state)
    required = ("step", *quantized.CODE_KEYS) if eight_bit else STATE_KEYS
    missing = [key for key in required if key not in p_state]
    if missing:
        raise ValueError(f"{where} is missing {missing}" + (" (8-bit state: codes beside its scales)" * eight_bit))
    known = STATE_KEYS + OPTIONAL_STATE_KEYS + quantized.CODE_KEYS + quantized.QUANTIZED_KEYS
    unknown = [key for key in p_state if key not in known]
    if unknown:
        # DCP's flatten_optimizer_state_dict=True rebuilds a state from the live state's names: a stepped optimizer
        # with per_coordinate_steps keeps its counts as 'coord_lag', so the checkpoint's 'coord_step' is not asked for
        flattened = (
            " (torch.distributed.checkpoint with flatten_optimizer_state_dict=True into an optimizer that has "
            "stepped with per_coordinate_steps: the counts are not read; load into a new optimizer, or unflattened)"
        ) * ("coord_lag" in unknown)
        raise ValueError(
            f"{where} has unknown entries {unknown} (AdamNX keeps {list(STATE_KEYS)} and 'coord_step'; 8-bit "
            f"moments {list(quantized.CODE_KEYS + quantized.QUANTIZED_KEYS)}){flattened}"
        )
    if not eight_bit and any(key in p_state for key in quantized.CODE_KEYS):
        raise ValueError(f"{where} holds 8-bit codes {list(quantized.CODE_KEYS)} without their scales")
    if eight_bit and any(key in p_state for key in ("exp_avg", "exp_avg_sq")):
        raise ValueError(f"{where} holds 8-bit codes and float moments ('exp_avg', 'exp_avg_sq') at once")
    step = _check_step(p_state["step"], where)
    if eight_bit:
        quantized.check_quantized_state(p_state, param, where)
        # Finite scales and codes hold finite float32 values, v ≥ 0: only a narrower dtype they are loaded in (a
        # float AdamNX's bf16 or fp16 state) can fail to hold them. Checked a piece at a time (no full-size copy).
        if target.itemsize < 4:
            for m, v in quantized.moment_chunks(p_state, _SCAN_ELEMENTS):
                _check_values(m, target, nonnegative=False, where=f"{where}: 8-bit 'exp_avg'")
                _check_values(v, target, nonnegative=True, where=f"{where}: 8-bit 'exp_avg_sq'")
        if "coord_step" in p_state:
            _check_coord_step(p_state["coord_step"], param, step, where)
        return
    for key in ("exp_avg", "exp_avg_sq"):
        value = p_state[key]
        if isinstance(value, Tensor) and value.is_nested:  # has no single shape to compare
            raise ValueError(f"{where}: '{key}' must be a dense tensor with values, got a nested tensor")
        if not isinstance(value, Tensor) or value.shape != param.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: '{key}' has shape {shape}, the parameter {tuple(param.shape)}")
        if value.is_complex() != param.is_complex() or value.dtype not in _MOMENT_DTYPES:
            raise ValueError(f"{where}: '{key}' is {value.dtype}, the parameter {param.dtype}")
        check_placed_like(value, param, f"{where}: '{key}'", _UNSHARDED)
        _check_dense(value, where, key)
        _check_values(local_part(value), target, nonnegative=key == "exp_avg_sq", where=f"{where}: '{key}'")
    if "coord_step" in p_state:
        _check_coord_step(p_state["coord_step"], param, step, where)


_SCAN_ELEMENTS = 1 << 24  # elements checked at a time: a load needs no full-size copy or mask of a moment


def _check_values(tensor: Tensor, target: torch.dtype, nonnegative: bool, where: str) -> None:
    """Finite in ``target``, the dtype the values are loaded in (1e5 is inf in float16), not rounded to 0 there where
    they are not 0 (an fp16 state turns v ≈ 1e-10 into 0, and the next update is hundreds of times too large), and
    ≥ 0 if asked."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _SCAN_ELEMENTS):
        original = flat[start : start + _SCAN_ELEMENTS]
        piece = original.to(target)
        real = torch.view_as_real(piece) if piece.is_complex() else piece
        if not bool(torch.isfinite(real).all()):
            raise ValueError(f"{where} holds inf or NaN (as {target}){_wider_hint(original, target)}")
        if original.dtype != target:
            source = torch.view_as_real(original) if original.is_complex() else original
            if bool(((real == 0) & (source != 0)).any()):
                raise ValueError(f"{where} holds non-zero values that are 0 in {target}{_wider_hint(original, target)}")
        if nonnegative and bool((real < 0).any()):
            raise ValueError(f"{where} holds negative values (it is an average of squares)")


def _wider_hint(original: Tensor, target: torch.dtype) -> str:
    """What to do when a checkpoint's moments do not fit the dtype the optimizer keeps them in."""
    if original.dtype.is_floating_point and target in (torch.float16, torch.bfloat16):
        return ": keep the moments in float32 with AdamNX(..., state_dtype=torch.float32)"
    return ""


def _check_dense(value: Tensor, where: str, key: str) -> None:
    """A tensor that holds its values in ordinary memory (not sparse, nested or meta), of a dtype with arithmetic."""
    local = local_part(value)
    if local.layout != torch.strided or local.is_nested or local.device.type == "meta" or local.dtype in _FLOAT8:
        raise ValueError(
            f"{where}: '{key}' must be a dense tensor with values, got {local.layout} {local.dtype} on {local.device}"
        )


def _check_step(step: Any, where: str) -> float:
    """A step count: a number or 1-element tensor, finite, integral, 0 ≤ step ≤ 2^53; returns it as a float."""
    if isinstance(step, Tensor):
        _check_dense(step, where, "step")
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(
                f"{where}: 'step' must be a number or a 0-d real tensor, got {step.dtype} {tuple(step.shape)}"
            )
        value = float(local_part(step).item())
    elif isinstance(step, numbers.Integral) and not isinstance(step, bool):
        if not 0 <= int(step) <= MAX_STEP:  # exactly: float(2**53 + 1) would round into range
            raise ValueError(f"{where}: 'step' must be a whole number in [0, 2^53], got {step}")
        value = float(step)
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    else:
        raise ValueError(f"{where}: 'step' must be a number or a 0-d tensor, got {type(step).__name__}")
    if not (math.isfinite(value) and value.is_integer() and 0 <= value <= MAX_STEP):
        raise ValueError(f"{where}: 'step' must be a whole number in [0, 2^53], got {value}")
    return value


def _check_coord_step(counts: Any, param: Tensor, step: float, where: str) -> None:
    shape = (*param.shape, 2) if param.is_complex() else tuple(param.shape)  # one count per real coordinate
    if not isinstance(counts, Tensor) or tuple(counts.shape) != shape:
        got = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
        raise ValueError(f"{where}: 'coord_step' has shape {got}, expected {shape}")
    check_placed_like(counts, param, f"{where}: 'coord_step'", _UNSHARDED)
    _check_dense(counts, where, "coord_step")
    if counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"{where}: 'coord_step' must hold integer counts, got {counts.dtype}")
    local = local_part(counts)
    if local.numel() == 0:
        return
    if local.is_floating_point() and not bool((torch.isfinite(local) & (local == local.round())).all()):
        raise ValueError(f"{where}: 'coord_step' must hold whole numbers")
    low, high = local.min().item(), local.max().item()
    if low < 0 or high > min(step, MAX_COORD_STEP):
        raise ValueError(f"{where}: 'coord_step' must lie in [0, step = {step:.0f}], got [{low}, {high}]")
