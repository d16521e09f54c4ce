"""The for-loop executor: :func:`adamnx.update.update` on one tensor at a time, in torch ops.

It also runs ``capturable=True`` and ``torch.compile(opt.step)`` (coefficients computed on the device from the step
tensors: no host sync) and ``differentiable=True`` (the update out of place, on copies, so that autograd runs back
through many steps). Tensors larger than a piece go in cache-sized pieces (bounded temporaries, and faster).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from adamnx.backends._pieces import host_moment_noise, in_pieces, in_row_pieces
from adamnx.guard import ROW, TENSOR
from adamnx.plan import Bucket, StepPlan, device_coefficients
from adamnx.update import Weights, update, update_copies

__all__ = ["execute"]


def execute(plan: StepPlan) -> None:
    hp = plan.hp
    lr: Any = hp.lr
    if isinstance(lr, Tensor) and not plan.on_device and not plan.differentiable:  # differentiable: a graph to lr
        lr = lr.item()
    for bucket in plan.buckets:
        step_lr = lr.to(bucket.math_dtype) if isinstance(lr, Tensor) else lr  # lr·λ in the math dtype, not lr's
        noise = host_moment_noise(plan, bucket)
        for i in range(len(bucket.params)):
            grad = -bucket.grads[i] if hp.maximize else bucket.grads[i]
            tensors = [bucket.params[i], grad, bucket.exp_avgs[i], bucket.exp_avg_sqs[i]]
            for (param, g, exp_avg, exp_avg_sq), weights in _pieces(plan, bucket, i, tensors):
                if plan.differentiable or bucket.wider:
                    update_copies(
                        param, g, exp_avg, exp_avg_sq, weights, step_lr, hp.weight_decay, hp.eps,
                        dtype=bucket.math_dtype, stochastic=bucket.stochastic, differentiable=plan.differentiable,
                        noise=noise,
                    )  # fmt: skip
                else:
                    update(param, g, exp_avg, exp_avg_sq, weights, step_lr, hp.weight_decay, hp.eps)


def _pieces(plan: StepPlan, bucket: Bucket, i: int, tensors: list[Tensor]) -> list[tuple[list[Tensor], Weights]]:
    """The tensor, or pieces of it, with its weights in the form the plan gives them (scalars, per row, per element)."""
    guard = bucket.guard
    if plan.on_device:
        step = bucket.steps[i] if guard is None else guard.device_counts(i, bucket.steps[i]).clamp_min(1)
        weights = device_coefficients(step, bucket.betas, bucket.math_dtype)
    elif guard is None or guard.layouts[i] == TENSOR:
        weights = bucket.scalar_coefficients(i)
    elif guard.layouts[i] == ROW and not (bucket.wider or plan.differentiable):
        return in_row_pieces(tensors, bucket.row_coefficients(i))  # small temporaries (g·w2 per row)
    elif plan.differentiable:
        weights = bucket.element_coefficients(i)
    else:  # per element, piece by piece: the gathered weights stay small
        lag = guard.expanded(i, tensors[0])
        return [(piece[:4], bucket.element_coefficients(i, piece[4])) for piece, _ in in_pieces([*tensors, lag], ())]
    if plan.differentiable:
        return [(tensors, weights)]
    return in_pieces(tensors, weights)
