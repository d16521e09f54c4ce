"""The optimizers the harness compares, and the decay-rate family used by the ablation.

:class:`DecayRuleAdam` is Adam's skeleton with a pluggable second-moment rule ``1 − β̂2_t``: everything else
(first moment, ε, decoupled weight decay, schedule) stays fixed, so only the rule differs. AdaX-W (Li et al.
2020) is a member of the family: its normalised second moment v̂_t = v_t/((1+β2)^t − 1) obeys
v̂_t = β̂_t v̂_{t−1} + (1 − β̂_t) g² with 1 − β̂_t = β2/((1+β2)^t − 1), which we evaluate stably (the raw
v_t of the paper overflows float32 after ~900k steps at β2 = 1e-4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adamnx import AdamNX, AdamNX8bit
from adamnx.schedule import first_moment_weight, second_moment_weight

__all__ = [
    "DECAY_RULES",
    "OPTIMIZERS",
    "DecayRuleAdam",
    "OptimizerSpec",
    "adamnx_beta2",
    "build_optimizer",
    "implementation_options",
    "optimizer_spec",
    "with_beta2",
]


def _adamnx_rule(t: float, beta2: float) -> float:
    return second_moment_weight(t, beta2)


def _adam_rule(t: float, beta2: float) -> float:
    # Adam's bias-corrected v̂_t = v_t/(1 − β2^t) follows this recursion exactly.
    return (1.0 - beta2) / -math.expm1(t * math.log(beta2))


def _adax_rule(t: float, beta2: float) -> float:
    # β2/((1+β2)^t − 1), with the AdaX β2 (1e-4 by default), = r^(t−1)(1−r)/(1−r^t) for r = 1/(1+β2).
    return beta2 / math.expm1(t * math.log1p(beta2))


def _mean_rule(t: float, beta2: float) -> float:
    return 1.0 / t


def _adafactor_rule(t: float, beta2: float) -> float:
    return t**-0.8  # Adafactor's β̂2_t = 1 − t^(−0.8)


# name → (1 − β̂2_t as a function of (t, β2), the β2 it is run with in the ablation, description)
DECAY_RULES: dict[str, tuple[Callable[[float, float], float], float, str]] = {
    "adam": (_adam_rule, 0.999, "Adam: constant β2 = 0.999 with bias correction"),
    "adax": (_adax_rule, 1e-4, "AdaX: v̂ = v/((1+β2)^t − 1), β2 = 1e-4"),
    "adamnx": (_adamnx_rule, 0.99, "AdamNX: c = β2^(1−β2), β2 = 0.99"),
    "mean": (_mean_rule, 0.0, "1/t: the plain mean of all g²"),
    "adafactor": (_adafactor_rule, 0.0, "Adafactor: 1 − β̂2_t = t^−0.8"),
}


class DecayRuleAdam(torch.optim.Optimizer):
    """Adam with a pluggable rule for ``1 − β̂2_t``; decoupled weight decay scaled by lr (as AdamW/AdamNX).

    Args:
        rule: a key of :data:`DECAY_RULES`.
        beta2: the rule's β2 (default: the rule's own).
        bias_correct_m: use AdamNX's/Adam's bias-corrected first moment (True) or AdaX's raw EMA (False).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        beta1: float = 0.9,
        rule: str = "adamnx",
        beta2: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bias_correct_m: bool = True,
    ) -> None:
        if rule not in DECAY_RULES:
            raise ValueError(f"unknown decay rule {rule!r}; choose from {sorted(DECAY_RULES)}")
        if not lr >= 0.0 or not 0.0 <= beta1 < 1.0 or not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"invalid hyperparameters lr={lr} beta1={beta1} eps={eps} weight_decay={weight_decay}")
        beta2 = DECAY_RULES[rule][1] if beta2 is None else beta2
        defaults = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.rule, self.bias_correct_m = rule, bias_correct_m

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rule = DECAY_RULES[self.rule][0]
        for group in self.param_groups:
            lr, beta1, beta2 = group["lr"], group["beta1"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                w1 = first_moment_weight(t, beta1) if self.bias_correct_m else 1.0 - beta1
                w2 = rule(t, beta2)
                if group["weight_decay"]:
                    p.add_(p, alpha=-lr * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, w1)
                state["exp_avg_sq"].mul_(1.0 - w2).addcmul_(p.grad, p.grad, value=w2)
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-lr)
        return loss


def adaxw(
    params: Any, lr: float = 5e-3, weight_decay: float = 5e-2, beta1: float = 0.9, beta2: float = 1e-4
) -> DecayRuleAdam:
    """AdaX-W (Li et al. 2020): raw EMA first moment, AdaX second moment, eps 1e-12, decoupled weight decay."""
    return DecayRuleAdam(
        params, lr=lr, beta1=beta1, rule="adax", beta2=beta2, eps=1e-12, weight_decay=weight_decay, bias_correct_m=False
    )


@dataclass(frozen=True)
class OptimizerSpec:
    """How the harness builds one optimizer: its constructor and the hyperparameters other than lr."""

    build: Callable[..., torch.optim.Optimizer]
    kwargs: dict[str, Any]
    constructor: str  # the exact call, for the report

    def make(self, params: Any, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
        kwargs = dict(self.kwargs)
        if weight_decay is not None and "weight_decay" in kwargs:
            kwargs["weight_decay"] = weight_decay
        return self.build(params, lr=lr, **kwargs)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamnx": OptimizerSpec(
        AdamNX,
        {"betas": (0.9, 0.99), "weight_decay": 0.01},
        "adamnx.AdamNX(params, lr, betas=(0.9, 0.99), weight_decay=0.01)",
    ),
    "adam": OptimizerSpec(
        torch.optim.Adam, {"betas": (0.9, 0.999)}, "torch.optim.Adam(params, lr, betas=(0.9, 0.999))"
    ),
    "adamw": OptimizerSpec(
        torch.optim.AdamW,
        {"betas": (0.9, 0.999), "weight_decay": 0.01},
        "torch.optim.AdamW(params, lr, weight_decay=0.01)",
    ),
    "adaxw": OptimizerSpec(
        adaxw, {"weight_decay": 0.05}, "adamnx.bench.optimizers.adaxw(params, lr, weight_decay=0.05)"
    ),
    "sgdm": OptimizerSpec(
        torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.0}, "torch.optim.SGD(params, lr, momentum=0.9)"
    ),
}
# AdamNX with compact state (the accuracy study of bf16 and 8-bit moments): the same hyperparameters and lr as AdamNX.
OPTIMIZERS["adamnx-bf16"] = OptimizerSpec(
    AdamNX,
    {"betas": (0.9, 0.99), "weight_decay": 0.01, "state_dtype": torch.bfloat16},
    "adamnx.AdamNX(params, lr, betas=(0.9, 0.99), weight_decay=0.01, state_dtype=torch.bfloat16)",
)
# min_8bit_size=256: the harness's models are small (MNIST-1D's CNN has no tensor of 4,096 elements), and the study
# is of 8-bit moments, so every weight matrix and conv kernel is quantized; biases keep float32 moments.
OPTIMIZERS["adamnx-8bit"] = OptimizerSpec(
    AdamNX8bit,
    {"betas": (0.9, 0.99), "weight_decay": 0.01, "min_8bit_size": 256},
    "adamnx.AdamNX8bit(params, lr, betas=(0.9, 0.99), weight_decay=0.01, min_8bit_size=256)",
)
for _rule in DECAY_RULES:
    OPTIMIZERS[f"rule-{_rule}"] = OptimizerSpec(
        DecayRuleAdam,
        {"rule": _rule, "weight_decay": 0.01},
        f"adamnx.bench.optimizers.DecayRuleAdam(params, lr, rule={_rule!r}, weight_decay=0.01)",
    )


# Variants made by with_beta2 (the horizon study's): kept apart so that OPTIMIZERS stays the fixed table the
# registry names, whatever ran before in the same process.
_VARIANTS: dict[str, OptimizerSpec] = {}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The spec of a named optimizer or of a variant that with_beta2 made."""
    spec = OPTIMIZERS.get(name) or _VARIANTS.get(name)
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return spec


def build_optimizer(name: str, params: Any, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    return optimizer_spec(name).make(params, lr, weight_decay)


def adamnx_beta2(name: str) -> float | None:
    """The β2 that AdamNX (``adamnx``) or AdamNX's rule (``rule-adamnx``) runs with here; None for other names."""
    if name == "adamnx":
        return float(OPTIMIZERS[name].kwargs["betas"][1])
    if name == "rule-adamnx":
        return float(OPTIMIZERS[name].kwargs.get("beta2", DECAY_RULES["adamnx"][1]))
    return None


def second_moment_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    """The second moments as values (for ‖Δv‖/‖v‖): the ``exp_avg_sq`` state tensors, or the values AdamNX8bit's
    codes hold (dequantized copies); [] for optimizers without them (SGD)."""
    from adamnx import quantized

    moments = []
    for state in opt.state.values():
        if "exp_avg_sq" in state:
            moments.append(state["exp_avg_sq"])
        elif quantized.is_quantized_state(state):
            moments.append(quantized.moments_of(state)[1])
    return moments


def with_beta2(name: str, beta2: float) -> str:
    """Register ``name`` (``adamnx`` or ``adamw``) with betas (0.9, ``beta2``); return the new name ``name-b2=…``.

    The horizon study runs both at the same β2; the spec keeps ``beta2`` exact, the name shows it rounded.
    """
    base = OPTIMIZERS[name]
    if "betas" not in base.kwargs:
        raise ValueError(f"optimizer {name!r} has no betas to change")
    beta1 = base.kwargs["betas"][0]
    new = f"{name}-b2={beta2:.4f}"
    call = base.constructor.split("(", 1)[0]
    wd = base.kwargs.get("weight_decay", 0.0)
    _VARIANTS[new] = OptimizerSpec(
        base.build,
        {**base.kwargs, "betas": (beta1, beta2)},
        f"{call}(params, lr, betas=({beta1}, {beta2!r}), weight_decay={wd})",
    )
    return new


def implementation_options() -> dict[str, dict[str, bool]]:
    """Every implementation a user selects (a set of constructor options of the rows of ``adamnx.backends.BACKENDS``),
    by the name the bench gives it (``forloop``, ``foreach``, ``fused``): what `adamnx perf` times and `adamnx stress`
    stresses. Rows that share options (fused's C++ and accelerator kernels) are one implementation: the device picks."""
    from adamnx.backends import BACKENDS

    options: dict[str, dict[str, bool]] = {}
    for backend in BACKENDS.values():
        name = next((key for key, value in backend.options.items() if value), "forloop")
        options.setdefault(name, dict(backend.options))
    return options
