"""The ``torch.optim`` AdamNX optimizer: validation, state and plumbing. It names no implementation: a step is planned
by :mod:`adamnx.plan` and run by the row of :mod:`adamnx.backends` its flags select; the math lives in
:mod:`adamnx.update` (and the schedule in :mod:`adamnx.schedule`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adamnx import backends, guard, quantized
from adamnx._dtensor import any_across, any_nonzero, is_dtensor, local_part
from adamnx._validation import (
    KEPT_ON_LOAD,
    MAX_COORD_STEP,
    OPTION_DEFAULTS,
    as_float,
    check_hyperparameters,
    check_state_dict,
)
from adamnx.backends import Backend
from adamnx.functional import step_tensors
from adamnx.plan import Hyperparameters
from adamnx.update import math_dtype

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["AdamNX"]


def _normalised(group: dict[str, Any]) -> dict[str, Any]:
    """betas, eps and weight_decay as Python floats (a tensor weight_decay would be formed in its own precision)."""
    out = dict(group)
    if "betas" in out:
        out["betas"] = tuple(as_float(b, f"betas[{i}]") for i, b in enumerate(out["betas"]))
    for key in ("eps", "weight_decay"):
        if isinstance(out.get(key), Tensor):
            out[key] = as_float(out[key], key)
    if isinstance(out.get("lr"), Tensor) and out["lr"].dim():
        out["lr"] = out["lr"].view(())  # a view: a scheduler filling the user's tensor still sets this lr
    return out


def _real(t: Tensor) -> Tensor:
    """A complex tensor's real view (its coordinates, one per real number), else the tensor."""
    return torch.view_as_real(t.detach()) if t.is_complex() else t.detach()


def _bias_corrected(p_state: Mapping[str, Any], beta1: float, beta2: float, where: str) -> dict[str, Any]:
    """An Adam/AdamW parameter state with its moments divided by their bias corrections 1 − β^t (in float64)."""
    missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in p_state]
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    step = as_float(p_state["step"], "step")
    if not step >= 1:
        return {}  # nothing was accumulated: the parameter starts at t = 1
    out = dict(p_state)
    for key, beta in (("exp_avg", beta1), ("exp_avg_sq", beta2)):
        moment = p_state[key]
        if not isinstance(moment, Tensor):
            raise ValueError(f"{where}: '{key}' must be a tensor, got {type(moment).__name__}")
        correction = -math.expm1(step * math.log(beta)) if beta > 0 else 1.0  # 1 − β^t, accurate for β^t ≈ 1
        out[key] = (moment.to(torch.float64) / correction).to(moment.dtype)
    return out


def _step_dtype(device: torch.device) -> torch.dtype:
    # float64 counts exactly to 2^53 steps; MPS has no float64, so it gets float32 (exact to 2^24).
    return torch.float32 if device.type == "mps" else torch.float64


class AdamNX(torch.optim.Optimizer):
    r"""AdamNX: Adam whose second-moment decay :math:`\hat\beta_{2,t}` rises to 1 (arXiv 2511.13465).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt} \\
            &\textbf{input}: \eta \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)}, \epsilon \text{ (eps)},
                \lambda \text{ (weight decay)}, \theta_0 \text{ (params)}, f \text{ (objective)} \\
            &\textbf{initialize}: m_0 \leftarrow 0,\ v_0 \leftarrow 0,\ c \leftarrow \beta_2^{\,1-\beta_2} \\
            &\rule{110mm}{0.4pt} \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) \quad (- \text{ if maximize}) \\
            &\hspace{5mm} \beta_{1,t} \leftarrow (\beta_1 - \beta_1^t)/(1 - \beta_1^t) \\
            &\hspace{5mm} \hat\beta_{2,t} \leftarrow (1 - c^{t-1})/(1 - c^t) \\
            &\hspace{5mm} \theta_{t-1} \leftarrow \theta_{t-1}(1 - \eta\lambda) \\
            &\hspace{5mm} m_t \leftarrow \beta_{1,t} m_{t-1} + (1 - \beta_{1,t}) g_t \\
            &\hspace{5mm} v_t \leftarrow \hat\beta_{2,t} v_{t-1} + (1 - \hat\beta_{2,t}) g_t^2 \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \eta\, m_t / (\sqrt{v_t} + \epsilon) \\
            &\rule{110mm}{0.4pt} \\
       \end{aligned}

    There is no separate bias correction: it is folded into :math:`\beta_{1,t}` and :math:`\hat\beta_{2,t}`
    (:math:`m_t` equals Adam's :math:`\hat m_t`; at t = 1, :math:`m_1 = g_1` and :math:`v_1 = g_1^2`).
    :math:`v_t` is a normalised average of *all* past :math:`g^2` in which the oldest weigh most; after
    about :math:`H = 1/(1-c) \approx 1/(1-\beta_2)^2` steps it freezes and AdamNX becomes momentum SGD with a
    fixed per-coordinate preconditioner (see :func:`adamnx.horizon`).

    Args:
        params: an iterable of parameters, named parameters, or param-group dicts.
        lr: learning rate η (float or 1-element tensor; default 1e-3).
        betas: (β1, β2) (default (0.9, 0.99), the authors' choice). β2 sets the horizon: 0.99 → ~9,950 steps.
        eps: added to √v_t (default 1e-8).
        weight_decay: decoupled weight decay λ, multiplied by the scheduled lr (default 0.01).
        maximize: maximize the objective instead of minimizing it.
        foreach: use the multi-tensor implementation (``None``: as torch.optim decides — on accelerators).
        capturable: keep the step counter on the param's device and compute the coefficients there, so the
            step can be captured in a CUDA graph (no host syncs).
        differentiable: let autograd run through the step (slower; for meta-learning).
        fused: use the fused one-pass implementation (CPU and CUDA; supports ``GradScaler``'s found_inf).
        state_dtype: dtype of m and v (``None``: the param's, like torch). ``torch.float32`` for bf16/fp16 params
            keeps the moments in float32 and computes the update in float32, rounding the param once.
            ``torch.bfloat16`` halves float32 params' state. bf16 moments always round stochastically (unbiased):
            AdamNX's weight 1 − β̂2_t ≈ 1/t would make round-to-nearest bias v upwards.
        stochastic_rounding: round bf16 params' updates stochastically (unbiased), so that updates smaller
            than half a bf16 ulp are not lost; computes the update in float32. Ignored for other dtypes. (Every
            stochastic rounding draws from torch's generators seeded by the step itself, restored afterwards: data-
            parallel replicas round alike, and torch's random stream is left as it was; capturable and compiled
            steps draw from the device's generator as it is.)
        skip_nonfinite: skip the step of a param group whose gradients contain inf/NaN, leaving params,
            moments and step counts untouched; counts skips in ``param_group["skipped_steps"]``. Costs one
            host sync per group and step. Default off, like torch: no hidden checks in the hot path.
        per_coordinate_steps: count steps per coordinate, from its first non-zero gradient, so that a coordinate that first gets a gradient at a late
            step t follows the paper's schedule from its own t = 1 (m = g, v = g², then v the mean of its
            g²) instead of getting (1 − β̂2_t)·g² and a first update of ~0.1/√(1 − β̂2_t) × lr (25× lr at
            t = 20k for β2 = 0.99). For embeddings with rare rows and parameters whose parts start late. Every
            implementation supports it. The state keeps when each coordinate started, written once (``coord_lag``:
            one int32 for a tensor whose coordinates started together, one per row, or one per coordinate; see
            :mod:`adamnx.guard`), and ``state_dict()`` saves every coordinate's count as ``coord_step`` (int32);
            :meth:`coord_steps` reads them. The coefficients of each count come from a table (12 bytes per step
            of the run for float32 math), so the step stays one pass over memory. Off by default: the paper's
            algorithm.

    State per parameter (as torch.optim.AdamW): ``step`` (float64 0-d tensor, exact to 2^53),
    ``exp_avg`` (m), ``exp_avg_sq`` (v); with ``per_coordinate_steps``, ``coord_lag``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        skip_nonfinite: bool = False,
        per_coordinate_steps: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "state_dtype": state_dtype,
            "stochastic_rounding": stochastic_rounding,
            "skip_nonfinite": skip_nonfinite,
            "per_coordinate_steps": per_coordinate_steps,
        }
        check_hyperparameters(defaults)  # before the base class builds any group or state
        self._supported_groups: dict[int, tuple] = {}  # group id → its rows and the ids of its params they accept
        self._gradient_release: Any = None  # adamnx.release.GradientRelease while gradients are released
        self._stepping_only: Tensor | None = None  # gradient release: the one param a step updates
        super().__init__(params, _normalised(defaults))

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands the step its grad_scale/found_inf (instead of unscaling the grads itself and skipping
        # inf steps) only when every group runs implementations that honour them. Gradient release: always, so that
        # the step sees the scaler and refuses it with a clear message.
        if getattr(self, "_gradient_release", None) is not None:
            return True
        return all(all(b.amp for b in backends.rows_for(g["fused"], g["foreach"])) for g in self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check a new group's own hyperparameters before the base class stores it.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_hyperparameters(merged)
        release = getattr(self, "_gradient_release", None)  # not yet set while the constructor adds its groups
        if release is not None:
            release.check_new_group(merged, len(self.param_groups))
        super().add_param_group(_normalised(param_group))
        if release is not None:
            release.watch(len(self.param_groups) - 1)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (torch.optim's). With gradients released (:func:`adamnx.release_gradients`) each
        gradient is freed after its param's step already, and one being accumulated stays."""
        release = getattr(self, "_gradient_release", None)
        if release is not None:
            release.zero_grad()
            return
        super().zero_grad(set_to_none)

    def _stepped(self, group: dict[str, Any]) -> list[Tensor]:
        """The params of a group that a step updates: those with a gradient; with gradients released, the one param
        whose gradient has just arrived (others may hold gradients being accumulated)."""
        only = self._stepping_only
        if only is not None:  # the caller (adamnx.release) knows the param's group
            return [only] if only.grad is not None else []
        return [p for p in group["params"] if p.grad is not None]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._supported_groups = {}  # new group objects (a copy, a pickle, a load): check them again
        # a load keeps released gradients released; a copy or a pickle starts without (its hooks are not copied)
        self.__dict__.setdefault("_gradient_release", None)
        self.__dict__.setdefault("_stepping_only", None)
        # Fill options that older checkpoints (including the authors' implementation) do not have.
        for group in self.param_groups:
            for key, value in OPTION_DEFAULTS.items():
                group.setdefault(key, value)
            group.update(_normalised({k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}))
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = self._exact_step(p_state["step"], p, group)
                if "coord_step" in p_state:  # an optimizer pickled before lags were kept
                    self._counts_to_lags(p_state, p)

    @staticmethod
    def _exact_step(step: Any, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A step counter in our format: float64 0-d tensor, on the param's device if capturable or fused."""
        device = param.device if group["capturable"] or group["fused"] else torch.device("cpu")
        value = step.detach() if isinstance(step, Tensor) else torch.tensor(float(step), dtype=torch.float64)
        return value.to(device=device, dtype=_step_dtype(device), copy=True).reshape(())

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as torch.optim saves it, with each coordinate's count as ``coord_step`` (int32, shaped
        like the param's real view) where ``per_coordinate_steps`` keeps lags: the format every version saves."""

        # A guarded group's state saved without counts (it has not stepped since the guard was switched on) gets
        # them, or a restart through DCP (whose template asks for them) would be refused.
        for group in self.param_groups:
            if group["per_coordinate_steps"]:
                self._guard_states([p for p in group["params"] if self.state.get(p)])

        def with_counts(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:  # before user hooks
            saved = state_dict["state"]
            for pid, p_state in saved.items():
                if "coord_lag" in p_state:  # a new dict: torch's packs the optimizer's own state dicts
                    kept = {key: value for key, value in p_state.items() if key != "coord_lag"}
                    saved[pid] = {**kept, "coord_step": self._counts(p_state)}

        handle = self.register_state_dict_post_hook(with_counts, prepend=True)
        try:
            saved = super().state_dict()
        finally:
            handle.remove()
        return saved

    def coord_steps(self, param: Tensor) -> Tensor | None:
        """Each coordinate's step count (int32, shaped like ``param``'s real view: a complex param's has a last
        dimension of 2), or None when the param has none (``per_coordinate_steps`` off, or no step yet)."""
        p_state = self.state.get(param, {})
        if "coord_step" in p_state:  # the state-creating probe's counts, not yet a step's lags
            return p_state["coord_step"].clone()
        return self._counts(p_state) if "coord_lag" in p_state else None

    def _counts(self, p_state: dict[str, Any]) -> Tensor:
        like = p_state["exp_avg_sq_codes" if "exp_avg_sq_codes" in p_state else "exp_avg_sq"]
        like = torch.view_as_real(like) if like.is_complex() else like
        return guard.counts(p_state["coord_lag"], float(p_state["step"]), like)

    @staticmethod
    def _counts_to_lags(p_state: dict[str, Any], p: Tensor) -> None:
        """Counts under their saved name ``coord_step`` in a live state (the state-creating probe's, a checkpoint's,
        an optimizer pickled before lags were kept) become the lags the step reads, in the coarsest layout that
        holds them. A count of 0 where v is not 0, which no guarded run saves, is a checkpoint without counts read
        through a template that had them (the probe's zeros, kept by DCP's partial load or full_state_dict=True
        load): such a coordinate counts from the tensor's step, as in a checkpoint without counts."""
        counts = p_state.pop("coord_step").to(p.device, torch.int32, copy=True)
        step = float(p_state["step"])
        if step > 0:
            history = AdamNX._history_counts(p_state, p)
            counts = torch.where((counts == 0) & (history > 0), history, counts)
        p_state["coord_lag"] = guard.lags_from_counts(counts, step, _real(p))

    @staticmethod
    def _history_counts(p_state: dict[str, Any], p: Tensor) -> Tensor:
        """The counts of a state kept without them: the tensor's step for every coordinate with a history (v > 0),
        0 for the others."""
        v = p_state["exp_avg_sq_codes" if "exp_avg_sq_codes" in p_state else "exp_avg_sq"]  # codes: 0 is v = 0
        v = torch.view_as_real(v) if p.is_complex() else v
        return torch.where(v > 0, min(int(p_state["step"]), MAX_COORD_STEP), 0).to(torch.int32)

    def load_state_dict(self, state_dict: dict[str, Any], from_optimizer: str | None = None) -> None:
        """Load a state dict (ours, or the authors'; torch's Adam or AdamW with ``from_optimizer``).

        Everything is checked first (see :mod:`adamnx._validation`), after any load pre-hooks ran: a refused state
        dict raises a ValueError that names the group or parameter and the field, and leaves the optimizer exactly
        as it was. The loaded state is the optimizer's own copy, with exact values: step counts as float64, moments
        in the group's ``state_dtype``, per-coordinate counts exactly (torch's loader would cast them all to the
        param's dtype).

        The hyperparameters (lr, betas, eps, weight_decay, maximize) are the checkpoint's, as with torch.optim; the
        options that say how this process steps (``foreach``, ``fused``, ``capturable``, ``differentiable``,
        ``state_dtype``, ``stochastic_rounding``, ``skip_nonfinite``, ``per_coordinate_steps``) stay the
        optimizer's own, with a warning naming each one a checkpoint saved otherwise. Moments that the kept
        ``state_dtype`` cannot hold (non-zero values that round to 0, or overflow) are refused.

        Args:
            state_dict: the state dict.
            from_optimizer: ``"adamw"`` or ``"adam"`` to take the moments and step counts of a state dict saved by
                ``torch.optim.AdamW`` or ``Adam`` (refused without it: their moments are not bias-corrected). Their
                moments are bias-corrected (m / (1 − β1^t), v / (1 − β2^t), with the checkpoint's betas), so that
                AdamNX's first update is close to the one AdamW would have made; the step counts go on; the
                hyperparameters stay this optimizer's. AMSGrad states are refused.
        """
        if not isinstance(state_dict, Mapping):  # torch's loader would fail on it before any hook runs
            raise ValueError(
                f"state_dict must be a dict with 'state' and 'param_groups', got {type(state_dict).__name__}"
            )
        if from_optimizer is not None:
            state_dict = self._converted(state_dict, from_optimizer)
        loaded: dict[str, Any] = {}
        before = self.state, self.param_groups

        def check(optimizer: torch.optim.Optimizer, hooked: dict[str, Any]) -> dict[str, Any]:  # after user pre-hooks
            hooked = quantized.upgraded_state_dict(hooked)  # the first 8-bit version's codes under today's names
            check_state_dict(hooked, self.param_groups, self._keeps_8bit)
            loaded["state_dict"] = hooked
            # torch's loader gets empty states: it would cast a copy of every tensor to the param's dtype (8-bit
            # codes to float32: 4 bytes per byte) only for restore to replace them with exact copies
            return {**hooked, "state": {pid: {} for pid in hooked["state"]}}

        def restore(optimizer: torch.optim.Optimizer) -> None:  # before user post-hooks, which may change it again
            loaded["differences"] = self._keep_options(before[1], loaded["state_dict"]["param_groups"])
            self._restore_exact_state(loaded["state_dict"])

        handles = [
            self.register_load_state_dict_pre_hook(check),
            self.register_load_state_dict_post_hook(restore, prepend=True),
        ]
        try:
            super().load_state_dict(state_dict)  # replaces self.state and self.param_groups with new objects
        except BaseException:
            self.state, self.param_groups = before
            raise
        finally:
            for handle in handles:
                handle.remove()
        if loaded.get("differences"):
            warnings.warn(
                "load_state_dict kept this optimizer's options where the checkpoint's differ: "
                + "; ".join(loaded["differences"])
                + ". Pass the options you want to the constructor.",
                stacklevel=2,
            )

    def _keep_options(self, own_groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]]) -> list[str]:
        """The loaded groups take this optimizer's options back (KEPT_ON_LOAD); the differences, for one warning."""
        differences = []
        for index, (group, own, saved) in enumerate(zip(self.param_groups, own_groups, saved_groups)):
            for key in KEPT_ON_LOAD:
                if key in saved and saved[key] != own[key]:
                    differences.append(f"group {index} {key} (checkpoint: {saved[key]!r}, kept: {own[key]!r})")
                group[key] = own[key]
        return differences

    def _converted(self, state_dict: Mapping[str, Any], from_optimizer: str) -> dict[str, Any]:
        """A state dict of torch's Adam or AdamW as AdamNX's: bias-corrected moments, the same step counts, and this
        optimizer's hyperparameters. Refuses anything else, before anything changes."""
        if from_optimizer not in ("adam", "adamw"):
            raise ValueError(f"from_optimizer must be 'adam' or 'adamw', got {from_optimizer!r}")
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, Mapping):
            raise ValueError("state_dict must have a 'state' dict and a 'param_groups' list")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        converted_groups, converted_state = [], {}
        for index, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping) or "amsgrad" not in saved or "params" not in saved:
                raise ValueError(
                    f"param group {index}: from_optimizer={from_optimizer!r} takes a state dict saved by "
                    f"torch.optim.{'AdamW' if from_optimizer == 'adamw' else 'Adam'} (its groups have 'amsgrad')"
                )
            if saved["amsgrad"]:
                raise ValueError(f"param group {index}: AMSGrad's max_exp_avg_sq has no AdamNX counterpart")
            beta1, beta2 = (as_float(b, "betas") for b in saved["betas"])
            for pid in saved["params"]:
                p_state = state.get(pid)
                if p_state:
                    converted_state[pid] = _bias_corrected(p_state, beta1, beta2, f"state of parameter {pid}")
            converted_groups.append({**{k: v for k, v in own.items() if k != "params"}, "params": saved["params"]})
        return {"state": converted_state, "param_groups": converted_groups}

    def _restore_exact_state(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved_of = {id(p): state_dict["state"].get(pid) for pid, p in zip(saved_ids, self._all_params())}
        for group in self.param_groups:
            for p in group["params"]:
                saved = saved_of[id(p)]
                if not saved:
                    continue
                state = self.state[p]
                state["step"] = self._exact_step(saved["step"], p, group)
                for key in ("exp_avg", "exp_avg_sq", *quantized.CODE_KEYS, *quantized.QUANTIZED_KEYS):
                    state.pop(key, None)
                state.update(self._loaded_moments(saved, p, group))
                state.pop("coord_step", None)
                state.pop("coord_lag", None)
                if "coord_step" in saved:  # kept as lags, in the coarsest layout that holds them
                    state["coord_step"] = saved["coord_step"].detach()
                    self._counts_to_lags(state, p)

    def _loaded_moments(self, saved: Mapping[str, Any], p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        """A param's moments from a checkpoint in the format this optimizer keeps them: copies (never aliasing the
        caller's), exact when the formats agree; 8-bit codes dequantized, or float moments quantized, otherwise."""
        if self._keeps_8bit(p):
            if quantized.is_quantized_state(saved):
                keys = (*quantized.CODE_KEYS, *quantized.QUANTIZED_KEYS)
                # contiguous copies, whatever the saved strides: the fused kernel walks them in place
                return {
                    key: saved[key].detach().to(p.device).clone(memory_format=torch.contiguous_format) for key in keys
                }
            m, v = (saved[key].detach().to(p.device, torch.float32) for key in ("exp_avg", "exp_avg_sq"))
            return quantized.quantized_moments(m, v)
        state_dtype = self._state_dtype(p, group)
        if quantized.is_quantized_state(saved):
            m, v = quantized.moments_of({k: t.detach().to(p.device) for k, t in saved.items() if isinstance(t, Tensor)})
            return {"exp_avg": m.to(state_dtype), "exp_avg_sq": v.to(state_dtype)}
        return {
            key: saved[key].detach().to(device=p.device, dtype=state_dtype, copy=True)
            for key in ("exp_avg", "exp_avg_sq")
        }

    def _keeps_8bit(self, p: Tensor) -> bool:
        """Whether this optimizer keeps ``p``'s moments as 8-bit codes (:class:`adamnx.AdamNX8bit`)."""
        return False

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        scales: list[tuple[Tensor, Tensor] | None] | None = None,
    ) -> bool:
        if torch.compiler.is_compiling():
            # Traced apart from state creation, dynamo's analysis of these checks diverges when it restarts (they
            # read the state that creation writes); traced here, in the same pass, they compile (fullgraph too).
            self._check_params(group)
        with_grad = self._stepped(group)
        has_complex = False
        for p in with_grad:
            if not self.state.get(p):
                probe = self._is_state_init_probe(group, p)
                state = self.state[p]
                on_device = group["capturable"] or group["fused"]
                device = p.device if on_device else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=_step_dtype(device), device=device)
                if self._keeps_8bit(p):
                    state.update(quantized.new_state(p))
                else:
                    state_dtype = self._state_dtype(p, group)
                    state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                if group["per_coordinate_steps"] and not probe:  # in the state from the start (one branch less for
                    state["coord_lag"] = guard.fresh_lag(_real(p))  # torch.compile: fullgraph traces the first step)
                if probe:
                    if group["per_coordinate_steps"]:
                        # Every coordinate's count, 0, under its saved name: torch.distributed.checkpoint asks a
                        # checkpoint only for the entries this state holds (or the counts were silently dropped).
                        state["coord_step"] = torch.zeros_like(
                            _real(p), dtype=torch.int32, memory_format=torch.contiguous_format
                        )
                    continue  # state created, nothing stepped: t = 1 stays the first real step
            state = self.state[p]
            if not group["per_coordinate_steps"]:
                # Switched off (or never on): starts are no longer recorded, so lags kept would go stale, and a
                # checkpoint would then read otherwise than the live state. Switched on again, every coordinate with
                # a history counts from the tensor's step, live and after a load alike.
                state.pop("coord_lag", None)
                state.pop("coord_step", None)
            elif "coord_step" in state:  # the state-creating probe's counts (all 0): lags from the first real step on
                self._counts_to_lags(state, p)
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(_gradient(p))
            is_8bit = "exp_avg_absmax" in state
            exp_avgs.append(state["exp_avg_codes" if is_8bit else "exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq_codes" if is_8bit else "exp_avg_sq"])
            state_steps.append(state["step"])
            if scales is not None:
                scales.append((state["exp_avg_absmax"], state["exp_avg_sq_absmax"]) if is_8bit else None)
        return has_complex

    def _check_group(self, index: int, group: dict[str, Any]) -> None:
        """Everything that can make a group's step fail, checked before any group changes: a step that raises
        leaves every param, moment and counter as it was. Python checks only: no host sync, nothing per element."""
        try:
            check_hyperparameters(group, read_tensors=False)  # a user may have edited the group since
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None
        if not torch.compiler.is_compiling():
            self._check_params(group)
            try:
                self._check_representable(group)
            except ValueError as exc:
                raise ValueError(f"param group {index}: {exc}") from None

    def _check_representable(self, group: dict[str, Any]) -> None:
        """lr, lr·weight_decay and eps fit in the dtype each param's update is computed in (float32 for float32, bf16
        and fp16 params): 1e300 passes the ranges, then turns into inf there, and the step writes inf or NaN."""
        dtypes = {
            math_dtype(p.dtype, torch.float32 if self._keeps_8bit(p) else self._state_dtype(p, group))
            for p in self._stepped(group)
        }
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.device.type != "cpu":
                return  # reading it would sync the host: a capturable step never waits for it
            lr = lr.item()
        for dtype in sorted(dtypes, key=lambda d: torch.finfo(d).max):
            largest = torch.finfo(dtype).max
            for name, value in (("lr", lr), ("eps", group["eps"]), ("lr * weight_decay", lr * group["weight_decay"])):
                if abs(value) > largest:
                    raise ValueError(
                        f"{name} = {value!r} does not fit in {dtype}, the dtype these params' update is computed in "
                        f"(largest {largest:.4g}): the step would write inf or NaN"
                    )

    def _check_params(self, group: dict[str, Any]) -> None:
        """The gradients and state of a group's params: sparse, moved or cast params, the support of the
        implementations the group may run (devices and dtypes), counters."""
        state_dtype, differentiable = group["state_dtype"], group["differentiable"]
        capturable = group["capturable"]
        rows = backends.rows_for(group["fused"], group["foreach"])
        # Rows that step only some devices or dtypes (fused's): a param must suit one of them.
        limited = rows if all(b.devices or b.dtypes for b in rows) else []
        # Params that have state are checked for that support once per group and list of params (fused may have
        # been switched on since their state was created, or by a checkpoint); their device and dtype cannot change
        # unnoticed since (the moved-or-cast check below). (Under torch.compile the checks are traced, as constants
        # and guards: nothing to remember.)
        # (Stepping one param, gradient release: its support is checked directly, a key of the group costs more.)
        remember = bool(limited) and not torch.compiler.is_compiling() and self._stepping_only is None
        checked = (tuple(map(id, limited)), tuple(map(id, group["params"]))) if remember else ()
        support_checked = remember and self._supported_groups.get(id(group)) == checked
        with_grad = self._stepped(group)
        for p in with_grad:
            grad = _gradient(p)
            if grad.is_sparse:
                raise RuntimeError("AdamNX does not support sparse gradients")
            if differentiable and p.is_leaf and p.requires_grad:
                raise RuntimeError(
                    "differentiable=True updates the params in place under autograd, which a leaf that requires grad "
                    "does not allow: step non-leaf params (p = p0.clone()), as with torch.optim"
                )
            state = self.state.get(p)
            if limited and not (support_checked and state):
                self._check_support(limited, p)
            if not state:
                if state_dtype is not None and p.is_complex():
                    raise RuntimeError("state_dtype is not supported for complex parameters")
                continue
            wanted = p.dtype if state_dtype is None or p.is_complex() else state_dtype
            is_8bit = "exp_avg_absmax" in state
            if is_8bit and not self._keeps_8bit(p):
                raise RuntimeError(
                    f"a parameter is now {p.dtype} with {p.numel()} elements, which keeps no 8-bit moments, but its "
                    "state holds 8-bit codes: it was cast after the state was created. Call "
                    "opt.load_state_dict(opt.state_dict()) to convert the state along with it."
                )
            for key in quantized.CODE_KEYS if is_8bit else ("exp_avg", "exp_avg_sq"):
                moment = state.get(key)
                if is_8bit:
                    wanted = torch.int8 if key == "exp_avg_codes" else torch.uint8
                if not isinstance(moment, Tensor) or moment.shape != p.shape:
                    shape = tuple(moment.shape) if isinstance(moment, Tensor) else type(moment).__name__
                    raise RuntimeError(
                        f"a parameter has shape {tuple(p.shape)} but its optimizer state '{key}' has {shape}: it was "
                        "resized (or the state replaced) after the state was created. Its moments cannot follow; "
                        "del opt.state[param] restarts that parameter's state at its next step."
                    )
                if moment.dtype != wanted or moment.device != p.device:
                    raise RuntimeError(
                        f"a parameter is now {p.dtype} on {p.device} but its optimizer state '{key}' is "
                        f"{moment.dtype} on {moment.device}: it was moved or cast after the state was created. "
                        "Call opt.load_state_dict(opt.state_dict()) to move the state along with it."
                    )
            if is_8bit:
                for key in quantized.QUANTIZED_KEYS:
                    scales = state.get(key)
                    shape = quantized.scales_shape(p)
                    if not isinstance(scales, Tensor) or scales.shape != shape or scales.dtype != torch.float32:
                        raise RuntimeError(
                            f"a parameter's 8-bit optimizer state '{key}' must be float32 of shape {shape}, one "
                            "scale per block of its elements: it was replaced by hand. del opt.state[param] restarts "
                            "that parameter's state at its next step."
                        )
                    if scales.device != p.device:
                        raise RuntimeError(
                            f"a parameter is on {p.device} but its optimizer state '{key}' is on {scales.device}: "
                            "call opt.load_state_dict(opt.state_dict()) to move the state along with it"
                        )
            if "coord_lag" in state and not guard.fits(state["coord_lag"], p):
                raise RuntimeError(
                    f"a parameter has shape {tuple(p.shape)} but its optimizer state 'coord_lag' "
                    f"{tuple(state['coord_lag'].shape)} does not fit it: del opt.state[param] restarts its state"
                )
            if differentiable and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            if capturable and state["step"].device != p.device:
                raise RuntimeError(
                    f"capturable=True needs the step counter on the param's device ({p.device}), it is on "
                    f"{state['step'].device}: call opt.load_state_dict(opt.state_dict()) after switching capturable on"
                )
        if limited and with_grad:
            flags = self._flags(group, with_grad)
            for device_type in sorted({p.device.type for p in with_grad}):
                backend = backends.select(flags, device_type)
                if backend.prepare is not None:
                    backend.prepare()  # build (or load) it now (then cached): fails before anything changes
        if remember:
            self._supported_groups[id(group)] = checked

    @staticmethod
    def _flags(group: dict[str, Any], params: list[Tensor]) -> dict[str, bool]:
        return backends.resolve_flags(
            group["fused"], group["foreach"], params, differentiable=group["differentiable"],
            capturable=group["capturable"], lr=group["lr"],
        )  # fmt: skip

    @staticmethod
    def _is_state_init_probe(group: dict[str, Any], p: Tensor) -> bool:
        """A step with lr = 0 and an all-zero gradient on a param without state: what torch.distributed.checkpoint's
        get/set_optimizer_state_dict do to create state. AdamNX's t = 1 is special (m_1 = g_1, v_1 = g_1²), so
        such a step creates the state without counting: the next real step is still t = 1. Checked only when
        state is created (one host sync per param, once)."""
        lr = group["lr"]
        if (lr.item() if isinstance(lr, Tensor) else lr) != 0:
            return False
        grad = p.grad
        assert grad is not None  # only params with a gradient are stepped
        # A DTensor's whole gradient (one all-reduce, once per param): a rank whose shard is all zero in a real first
        # step with lr = 0 (a warm-up from 0) counts it, as the others do, or the shards' counters would differ.
        return not any_nonzero(grad)

    @staticmethod
    def _state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
        return p.dtype if group["state_dtype"] is None or p.is_complex() else group["state_dtype"]

    def _guard_states(self, params: list[Tensor]) -> list[dict[str, Any]]:
        """The states whose ``coord_lag`` the step reads and writes. A state from a checkpoint saved without
        per_coordinate_steps starts every coordinate that has a history at the tensor's step count."""
        states = []
        for p in params:
            state = self.state[p]
            if "coord_lag" not in state and state["step"] > 0:
                state["coord_lag"] = guard.lags_from_counts(
                    self._history_counts(state, p), float(state["step"]), _real(p)
                )
            states.append(state)
        return states

    @staticmethod
    def _all_finite(grads: list[Tensor]) -> bool:
        """One host sync per group: whether every gradient is finite (the opt-in skip_nonfinite check)."""
        if not grads:
            return True
        per_tensor = [torch.isfinite(local_part(g)).all() for g in grads]
        finite = torch.stack([t.to(per_tensor[0].device) for t in per_tensor]).all()
        # FSDP2: every rank decides alike (one all-reduce per mesh), or a rank whose shard holds an inf would skip
        # alone and the shards of a param would count different steps
        meshes: list[DTensor] = []  # one DTensor per mesh (FSDP2 gives each layer a mesh object of its own, all equal)
        for g in grads:
            if is_dtensor(g) and not any(g.device_mesh == other.device_mesh for other in meshes):
                meshes.append(g)
        if not meshes:
            return bool(finite)
        seen = [any_across(~finite, like) for like in meshes]  # every mesh's, in the same order on every rank
        return not any(seen)

    @staticmethod
    def _check_support(rows: list[Backend], p: Tensor) -> None:
        """Refuse a param no row the group may run can step (a device or a real dtype none of them takes)."""
        if not any(b.supports(p) for b in rows):
            devices = sorted({d for b in rows for d in (b.devices or ())})
            raise RuntimeError(
                f"{rows[0].option()} supports floating-point params on {devices}; got {p.dtype} on {p.device.type}"
            )

    def _check_graph_capture(self) -> None:
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return
        if not torch.cuda.is_current_stream_capturing():
            return
        for group in self.param_groups:
            rows = backends.rows_for(group["fused"], group["foreach"])
            on_device = group["capturable"] and all(b.capturable for b in rows)
            # the guard sizes its coefficient table on the host (a sync), but with capturable=True
            no_sync = all(b.cuda_graph_safe for b in rows) and not group["per_coordinate_steps"]
            if not (on_device or no_sync):
                raise RuntimeError(
                    "Capturing a CUDA graph of AdamNX.step needs capturable=True (or fused=True without "
                    "per_coordinate_steps)"
                )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` (optional) re-evaluates the model and returns the loss.

        With gradients released (:func:`adamnx.release_gradients`) the backward pass has stepped every param
        already: this runs the closure, if any, and steps nothing more."""
        if self._gradient_release is not None:
            return self._gradient_release.step_called(closure)
        self._check_graph_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for index, group in enumerate(self.param_groups):
                self._check_group(index, group)
            for index, group in enumerate(self.param_groups):
                self._step_group(group, (index,))
        return loss

    def _step_param(self, p: Tensor, index: int, position: int) -> None:
        """Gradient release: step param ``p`` of group ``index`` (its ``position`` there) alone, with the checks of a
        whole step (a bad input raises before ``p`` or its state changes)."""
        group = self.param_groups[index]
        self._stepping_only = p
        try:
            self._check_group(index, group)
            self._step_group(group, (index, position))
        finally:
            self._stepping_only = None

    def _create_state_as_asked(self) -> None:
        """While gradients are released, ``step()`` steps nothing, but torch.distributed.checkpoint still creates
        state with one (lr = 0, every gradient 0: the state-creating probe) to build the template a load fills; or
        the template is empty and a restart silently loads no optimizer state at all. Params without state whose
        gradients are such a probe's are stepped here, one by one (which creates their state and counts nothing)."""
        for index, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                if p.grad is not None and not self.state.get(p) and self._is_state_init_probe(group, p):
                    self._step_param(p, index, position)

    def _step_group(self, group: dict[str, Any], place: tuple[int, ...]) -> None:
        """``place``: the group's index (and, for one param stepped alone, its position in the group), which
        stochastic rounding mixes into its seed: two groups, or two params, of the same shapes draw other noise."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        if group["skip_nonfinite"] and not self._all_finite([_gradient(p) for p in self._stepped(group)]):
            # Nothing of this group changes: params, moments and step counts stay as they were.
            group["skipped_steps"] = group.get("skipped_steps", 0) + 1
            return
        scales: list[tuple[Tensor, Tensor] | None] = []
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps, scales)
        if not params:
            return
        beta1, beta2 = group["betas"]
        hp = Hyperparameters(
            beta1, beta2, group["lr"], group["weight_decay"], group["eps"], group["maximize"],
            group["stochastic_rounding"],
        )  # fmt: skip
        step_tensors(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, hp, self._flags(group, params),
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
            capturable=group["capturable"], differentiable=group["differentiable"], has_complex=has_complex,
            guard_states=self._guard_states(params) if group["per_coordinate_steps"] else None,
            moment_scales=scales if any(s is not None for s in scales) else None, noise_key=place,
        )  # fmt: skip


def _gradient(p: Tensor) -> Tensor:
    """The gradient of a param a step updates (``AdamNX._stepped`` returns only params that have one)."""
    grad = p.grad
    assert grad is not None
    return grad
