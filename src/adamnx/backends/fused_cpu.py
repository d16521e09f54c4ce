"""The fused CPU executor: one C++ kernel (``csrc/fused_cpu.cpp``, built on first use by :mod:`._cpu_extension`) called
once per bucket for all its tensors: one pass over memory per tensor (read p, g, m, v once; write p, m, v once), one
parallel region, no Python per tensor. This is what makes it as fast as torch's fused AdamW on models with many small
tensors.

With the late-activation guard it reads each tensor's lags in their layout and records the starts of lags kept per
row or per element itself (a whole tensor's are the planner's); a tensor a row of which started in part is handed
back to the planner, which keeps its lags per element from then on.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from adamnx import quantized
from adamnx._dtensor import local_part
from adamnx._table import host_coefficients
from adamnx.backends import _cpu_extension, loop
from adamnx.guard import TENSOR
from adamnx.plan import Bucket, StepPlan
from adamnx.schedule import coefficients
from adamnx.update import update_copies

__all__ = ["advance_steps", "execute", "prepare"]


def prepare() -> None:
    """Build or load the C++ kernel before a step changes anything (a no-op once loaded)."""
    _cpu_extension.load()


def advance_steps(steps: list[Tensor]) -> list[float]:
    """The row's ``advance_steps``: every step counter (CPU) advanced by one, in one C++ call; the new counts."""
    out = torch.empty(len(steps), dtype=torch.float64)
    _cpu_extension.load().advance_steps_(steps, 1.0, out)
    return out.tolist()


@functools.lru_cache(maxsize=64)
def _shared_coefficients(step: float, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """One-element float64 tensors of a step's coefficients (read, never written, by the kernel)."""
    w1, w2 = host_coefficients(step, beta1, beta2)
    return torch.tensor([w1], dtype=torch.float64), torch.tensor([w2], dtype=torch.float64)


_NOTHING = torch.empty(0)


def execute(plan: StepPlan) -> None:
    hp = plan.hp
    # maximize and GradScaler's unscale in one factor (on the CPU, reading the scale costs nothing)
    grad_factor = (-1.0 if hp.maximize else 1.0) / (1.0 if plan.grad_scale is None else plan.grad_scale.item())
    lr = hp.lr.item() if isinstance(hp.lr, Tensor) else hp.lr
    ops = _cpu_extension.load()
    for b, bucket in enumerate(plan.buckets):
        if bucket.scales is not None:
            _step_8bit_bucket(ops, plan, b, bucket, lr, grad_factor)
        else:
            _step_bucket(ops, plan, b, bucket, lr, grad_factor)


def _step_8bit_bucket(ops: Any, plan: StepPlan, b: int, bucket: Bucket, lr: float, grad_factor: float) -> None:
    """8-bit moments (:mod:`adamnx.quantized`): the kernel steps the tensors whose coefficients are one set (no guard,
    or a guard whose coordinates started together); per-row and per-element coefficients, and memory it cannot walk,
    run :func:`adamnx.quantized.update_8bit` (their starts then recorded by the planner's finish)."""
    assert bucket.step_values is not None and bucket.scales is not None
    guard = bucket.guard
    scalar = [i for i in range(len(bucket.params)) if guard is None or guard.layouts[i] == TENSOR]
    w1s = torch.empty(len(scalar), dtype=torch.float64)
    w2s = torch.empty(len(scalar), dtype=torch.float64)
    for k, i in enumerate(scalar):
        weights = bucket.scalar_coefficients(i)
        w1s[k], w2s[k] = float(weights.one_minus_beta1_t), float(weights.one_minus_beta2_hat)
    parts = [
        quantized.local_tensors(
            bucket.params[i], bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i], *bucket.scales[i]
        )
        for i in scalar
    ]  # fmt: skip  (a DTensor param's local parts: blocks are per shard)
    lists = [[part[k] for part in parts] for k in range(6)]
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
    left = ops.fused_step_8bit_(
        *lists, w1s, w2s, lr, plan.hp.weight_decay, plan.hp.eps, grad_factor, bucket.stochastic, seed
    )  # fmt: skip
    others = sorted({*(scalar[k] for k in left), *(i for i in range(len(bucket.params)) if i not in set(scalar))})
    if others:
        # grad_factor holds maximize's sign already: execute_8bit applies maximize again, so undo it here
        factor = -grad_factor if plan.hp.maximize else grad_factor
        loop.execute_8bit(plan, bucket, others, lr, factor)
        if guard is not None:
            plan.handed_back += [(b, i) for i in others if guard.layouts[i] != TENSOR]


def _step_bucket(ops: Any, plan: StepPlan, b: int, bucket: Bucket, lr: float, grad_factor: float) -> None:
    assert bucket.step_values is not None
    hp, guard = plan.hp, bucket.guard
    tensors = [bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs]
    lags = [] if guard is None else list(guard.lags)
    if type(bucket.params[0]).__name__ == "DTensor":  # FSDP2's shards: the update is elementwise, on local shards
        tensors = [[local_part(t) for t in lst] for lst in tensors]
        lags = [local_part(lag) for lag in lags]
    tensors = [list(lst) for lst in tensors]  # the kernel may get contiguous copies in place of some
    steps = bucket.step_values
    if all(s == steps[0] for s in steps):  # the usual case: one count for the bucket, one pair of coefficients
        w1s, w2s = _shared_coefficients(steps[0], *bucket.betas)
    else:  # counters differ (a param that missed steps): coefficients per tensor
        w1s, w2s = coefficients(torch.tensor(steps, dtype=torch.float64), bucket.betas)
    table = _NOTHING
    if guard is not None:
        found = guard.table()
        if found is None:  # counts too long for a table: coefficients evaluated per element, eagerly
            for i in range(len(steps)):
                _eager(plan, bucket, i, lr, grad_factor)
                plan.handed_back.append((b, i))
            return
        table = found
    relative = torch.tensor(guard.relative_steps if guard is not None else [], dtype=torch.int64)
    broken = torch.zeros(len(steps) if guard is not None else 0, dtype=torch.int32)
    # stochastic rounding's stream: params (stochastic_rounding) and bf16 moments (always) round stochastically
    random = bucket.stochastic or bucket.exp_avgs[0].dtype == torch.bfloat16
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) if random else 0
    kernel_arguments = (w1s, w2s, relative, table, broken, lr, hp.weight_decay, hp.eps, grad_factor, bucket.stochastic)
    left = ops.fused_step_(*tensors, lags, *kernel_arguments, seed)
    # Tensors it could not walk in place (a param and its grad in other memory orders): the same kernel steps
    # contiguous copies of them, written back; dtype pairs without a kernel go eagerly.
    copied = [i for i in left if _walkable_copied(tensors, lags, i)]
    if copied:
        copies = [_contiguous(tensors, lags, i) for i in copied]
        subset = [[lst[i] for i in copied] for lst in tensors]
        sub_lags = [lags[i] for i in copied] if lags else []
        w1, w2 = (w if w.numel() == 1 else w[copied] for w in (w1s, w2s))
        sub_relative = relative[copied] if guard is not None else relative
        sub_broken = torch.zeros(len(copied) if guard is not None else 0, dtype=torch.int32)
        other_seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**64 - 2**63  # another random stream
        still = ops.fused_step_(
            *subset, sub_lags, w1, w2, sub_relative, table, sub_broken, *kernel_arguments[5:], other_seed
        )  # fmt: skip
        if guard is not None:
            broken[copied] = sub_broken
        for originals, contiguous in copies:
            for original, copy in zip(originals, contiguous):
                if copy is not original:
                    original.copy_(copy)
        left = [i for i in left if i not in copied] + [copied[j] for j in still]
    for i in left:  # dtype pairs without a kernel: the same math, eagerly
        _eager(plan, bucket, i, lr, grad_factor)
    if guard is not None:
        plan.handed_back += [(b, i) for i in {*left, *broken.nonzero().view(-1).tolist()}]


def _walkable_copied(tensors: list[list[Tensor]], lags: list[Tensor], i: int) -> bool:
    """Whether the kernel walks tensor ``i`` once its tensors are contiguous copies (it refused a layout, not a
    dtype pair)."""
    p, g, m, v = (lst[i] for lst in tensors)
    return g.dtype == p.dtype and v.dtype == m.dtype and (not lags or lags[i].dtype == torch.int32)


def _contiguous(tensors: list[list[Tensor]], lags: list[Tensor], i: int) -> tuple[list[Tensor], list[Tensor]]:
    """Swap tensor ``i`` (and its lags) for contiguous copies in the lists; the tensors the step writes (param,
    moments, lags) and their copies, to write back. The gradient is only read: never written (it may be a
    broadcast view that cannot be)."""
    lists = [*tensors, *([lags] if lags else [])]
    originals = [lst[i] for lst in lists]
    copies = [t.contiguous() for t in originals]
    for lst, copy in zip(lists, copies):
        lst[i] = copy
    written = [k for k in range(len(lists)) if k != 1]
    return [originals[k] for k in written], [copies[k] for k in written]


def _eager(plan: StepPlan, bucket: Bucket, i: int, lr: float, grad_factor: float) -> None:
    """Tensor ``i`` of the bucket with the same update in torch ops."""
    hp = plan.hp
    weights = bucket.scalar_coefficients(i) if bucket.guard is None else bucket.element_coefficients(i)
    grad = bucket.grads[i].to(bucket.math_dtype) * grad_factor
    update_copies(
        bucket.params[i], grad, bucket.exp_avgs[i], bucket.exp_avg_sqs[i], weights, lr, hp.weight_decay, hp.eps,
        dtype=bucket.math_dtype, stochastic=bucket.stochastic,
    )  # fmt: skip
