"""The ``torch.optim`` AdamNX optimizer: validation, state and plumbing. The math lives in functional.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from adamnx.functional import adamnx

__all__ = ["AdamNX"]

_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def _as_float(value: Any, name: str) -> float:
    """Accept a Python number or a 1-element tensor (as torch.optim does) and return a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


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
        stochastic_rounding: round bf16 params' updates stochastically (unbiased), so that updates smaller
            than half a bf16 ulp are not lost; computes the update in float32. Ignored for other dtypes.
        skip_nonfinite: skip the step of a param group whose gradients contain inf/NaN, leaving params,
            moments and step counts untouched; counts skips in ``param_group["skipped_steps"]``. Costs one
            host sync per group and step. Default off, like torch: no hidden checks in the hot path.
        per_coordinate_steps: count steps per coordinate, from its first non-zero gradient (an extra int32
            state tensor ``coord_step`` per param), so that a coordinate that first gets a gradient at a late
            step t follows the paper's schedule from its own t = 1 (m = g, v = g², then v the mean of its
            g²) instead of getting (1 − β̂2_t)·g² and a first update of ~0.1/√(1 − β̂2_t) × lr (25× lr at
            t = 20k for β2 = 0.99). For embeddings with rare rows and parameters whose parts start late;
            runs the for-loop implementation. Off by default: the paper's algorithm.

    State per parameter (as torch.optim.AdamW): ``step`` (float64 0-d tensor, exact to 2^53),
    ``exp_avg`` (m), ``exp_avg_sq`` (v).
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
        self._validate_group(defaults)  # before the base class builds any group or state
        defaults["betas"] = tuple(_as_float(b, f"betas[{i}]") for i, b in enumerate(betas))
        super().__init__(params, defaults)
        if fused:
            # GradScaler hands the fused step its grad_scale/found_inf instead of unscaling grads itself.
            self._step_supports_amp_scaling = True

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
            if group.get("foreach") and not group.get("capturable"):
                raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        lr_value = _as_float(lr, "lr")
        if not 0.0 <= lr_value < math.inf:
            raise ValueError(f"Invalid learning rate: {lr_value}")
        eps = _as_float(group["eps"], "eps")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"Invalid epsilon value: {eps}")
        weight_decay = _as_float(group["weight_decay"], "weight_decay")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        beta1, beta2 = _as_float(betas[0], "betas[0]"), _as_float(betas[1], "betas[1]")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if beta2 == 0.0:
            raise ValueError(
                "Invalid beta parameter at index 1: 0.0 (with beta2 = 0, v freezes at g_1^2 forever; use 0 < beta2 < 1)"
            )
        if group.get("fused"):
            if group.get("foreach"):
                raise ValueError("`fused` and `foreach` cannot both be True")
            if group.get("differentiable"):
                raise ValueError("`fused` does not support `differentiable=True`")
        if group.get("foreach") and group.get("differentiable"):
            raise ValueError("`foreach` does not support `differentiable=True`")
        state_dtype = group.get("state_dtype")
        if state_dtype is not None and state_dtype not in _FUSED_DTYPES:
            raise ValueError(f"state_dtype must be a floating-point torch.dtype or None, got {state_dtype!r}")
        if group.get("differentiable") and (state_dtype is not None or group.get("stochastic_rounding")):
            raise ValueError("`differentiable=True` does not support state_dtype or stochastic_rounding")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Check a new group's own hyperparameters before the base class stores it.
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_group(merged)
        if "betas" in param_group:
            param_group = {**param_group, "betas": tuple(_as_float(b, "betas") for b in param_group["betas"])}
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Fill options that older checkpoints (including the authors' implementation) do not have.
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("state_dtype", None)
            group.setdefault("stochastic_rounding", False)
            group.setdefault("skip_nonfinite", False)
            group.setdefault("per_coordinate_steps", False)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = self._exact_step(p_state["step"], p, group)

    @staticmethod
    def _exact_step(step: Any, param: Tensor, group: dict[str, Any]) -> Tensor:
        """A step counter in our format: float64 0-d tensor, on the param's device if capturable or fused."""
        device = param.device if group["capturable"] or group["fused"] else torch.device("cpu")
        value = step.detach() if isinstance(step, Tensor) else torch.tensor(float(step))
        return value.to(device=device, dtype=_step_dtype(device)).reshape(())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (ours, torch's AdamW-style, or the authors'); reject a mismatched one untouched."""
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("state_dict must have a 'state' dict and a 'param_groups' list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        saved_ids = [pid for g in saved_groups for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        for pid, p in zip(saved_ids, params):
            p_state = saved_state.get(pid)
            if not p_state:
                continue
            missing = [k for k in _STATE_KEYS if k not in p_state]
            if missing:
                raise ValueError(f"state of parameter {pid} is missing {missing}")
            for key in ("exp_avg", "exp_avg_sq"):
                value = p_state[key]
                if not isinstance(value, Tensor) or value.shape != p.shape:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"state '{key}' of parameter {pid} has shape {shape}, the parameter {tuple(p.shape)}"
                    )
                if value.is_complex() != p.is_complex():
                    raise ValueError(f"state '{key}' of parameter {pid} is {value.dtype}, the parameter {p.dtype}")
        # torch's loader casts 'step' to float32 for capturable/fused groups; keep the exact saved counts.
        exact_steps = {pid: saved_state[pid]["step"] for pid in saved_ids if saved_state.get(pid)}
        super().load_state_dict(state_dict)
        id_of = {id(p): pid for pid, p in zip(saved_ids, params)}
        for group in self.param_groups:
            for p in group["params"]:
                pid = id_of[id(p)]
                if pid in exact_steps:
                    self.state[p]["step"] = self._exact_step(exact_steps[pid], p, group)
                    # ... and casts the moments to the param's dtype: keep them in state_dtype, from the saved values
                    state_dtype = self._state_dtype(p, group)
                    if state_dtype != p.dtype:
                        for key in ("exp_avg", "exp_avg_sq"):
                            self.state[p][key] = saved_state[pid][key].to(device=p.device, dtype=state_dtype)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        with_grad = [p for p in group["params"] if p.grad is not None]
        for p in with_grad:  # every check before any state is created
            if p.grad.is_sparse:
                raise RuntimeError("AdamNX does not support sparse gradients")
            state = self.state.get(p)
            if not state:
                if group["fused"]:
                    self._check_fused_support(p)
                if group["state_dtype"] is not None and p.is_complex():
                    raise RuntimeError("state_dtype is not supported for complex parameters")
            elif state["exp_avg"].device != p.device or state["exp_avg"].dtype != self._state_dtype(p, group):
                raise RuntimeError(
                    f"a parameter is now {p.dtype} on {p.device} but its optimizer state is "
                    f"{state['exp_avg'].dtype} on {state['exp_avg'].device}: it was moved or cast after the state "
                    "was created. Call opt.load_state_dict(opt.state_dict()) to move the state along with it."
                )
        has_complex = False
        for p in with_grad:
            if not self.state.get(p):
                probe = self._is_state_init_probe(group, p)
                state = self.state[p]
                on_device = group["capturable"] or group["fused"]
                device = p.device if on_device else torch.device("cpu")
                state["step"] = torch.zeros((), dtype=_step_dtype(device), device=device)
                state_dtype = self._state_dtype(p, group)
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                if probe:
                    continue  # state created, nothing stepped: t = 1 stays the first real step
            state = self.state[p]
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        return has_complex

    @staticmethod
    def _is_state_init_probe(group: dict[str, Any], p: Tensor) -> bool:
        """A step with lr = 0 and an all-zero gradient on a param without state: what torch.distributed.checkpoint's
        get/set_optimizer_state_dict do to create state. AdamNX's t = 1 is special (m_1 = g_1, v_1 = g_1²), so
        such a step creates the state without counting: the next real step is still t = 1. Checked only when
        state is created (one host sync per param, once)."""
        lr = group["lr"]
        if (lr.item() if isinstance(lr, Tensor) else lr) != 0:
            return False
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # a DTensor: this rank's shard
        return not bool(grad.any())

    @staticmethod
    def _state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
        return p.dtype if group["state_dtype"] is None or p.is_complex() else group["state_dtype"]

    def _coord_steps(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor]:
        """The per-coordinate counters (created on first use; a checkpoint without them starts every coordinate
        that has a history at the tensor's step count)."""
        counters = []
        for p in params:
            state = self.state[p]
            v = torch.view_as_real(state["exp_avg_sq"]) if p.is_complex() else state["exp_avg_sq"]
            if "coord_step" not in state:
                start = int(state["step"].item())  # the tensor's count (0 before its first step)
                state["coord_step"] = torch.where(v > 0, start, 0).to(torch.int32)
            elif state["coord_step"].dtype != torch.int32:  # torch's loader casts state to the param's dtype
                state["coord_step"] = state["coord_step"].to(torch.int32)
            counters.append(state["coord_step"])
        return counters

    @staticmethod
    def _all_finite(grads: list[Tensor]) -> bool:
        """One host sync per group: whether every gradient is finite (the opt-in skip_nonfinite check)."""
        if not grads:
            return True
        per_tensor = [torch.isfinite(g).all() for g in grads]
        return bool(torch.stack([t.to(per_tensor[0].device) for t in per_tensor]).all())

    @staticmethod
    def _check_fused_support(p: Tensor) -> None:
        if p.device.type not in _FUSED_DEVICES or not (p.dtype in _FUSED_DTYPES or p.is_complex()):
            raise RuntimeError(
                f"fused=True supports floating-point params on {_FUSED_DEVICES}; got {p.dtype} on {p.device.type}"
            )
        if p.device.type == "cpu":
            from adamnx._fused import ensure_cpu_kernel

            ensure_cpu_kernel()  # build (or load) it now: a machine without a compiler fails before any state exists

    def _check_graph_capture(self) -> None:
        if torch.compiler.is_compiling() or not torch.cuda.is_available():
            return
        if torch.cuda.is_current_stream_capturing() and not all(
            g["capturable"] or g["fused"] for g in self.param_groups
        ):
            raise RuntimeError("Capturing a CUDA graph of AdamNX.step needs capturable=True (or fused=True)")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step. ``closure`` (optional) re-evaluates the model and returns the loss."""
        self._check_graph_capture()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            for group in self.param_groups:
                params: list[Tensor] = []
                grads: list[Tensor] = []
                exp_avgs: list[Tensor] = []
                exp_avg_sqs: list[Tensor] = []
                state_steps: list[Tensor] = []
                if group["skip_nonfinite"] and not self._all_finite(
                    [p.grad for p in group["params"] if p.grad is not None]
                ):
                    # Nothing of this group changes: params, moments and step counts stay as they were.
                    group["skipped_steps"] = group.get("skipped_steps", 0) + 1
                    continue
                has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps)
                beta1, beta2 = group["betas"]
                adamnx(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    state_steps,
                    getattr(self, "grad_scale", None),
                    getattr(self, "found_inf", None),
                    has_complex=has_complex,
                    foreach=group["foreach"],
                    capturable=group["capturable"],
                    differentiable=group["differentiable"],
                    fused=group["fused"],
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                    stochastic_rounding=group["stochastic_rounding"],
                    coord_steps=self._coord_steps(group, params) if group["per_coordinate_steps"] else None,
                )
        return loss
