"""The for-loop executor: :func:`adamnx.update.update` on one tensor at a time, in torch ops.

It also runs ``capturable=True`` and ``torch.compile(opt.step)`` (coefficients computed on the device from the step
tensors: no host sync) and ``differentiable=True`` (the update out of place, on copies, so that autograd runs back
through many steps). Tensors larger than a piece go in cache-sized pieces (bounded temporaries, and faster).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from adamnx._dtensor import is_dtensor, local_part
from adamnx.backends._pieces import host_moment_noise, in_pieces, in_row_pieces, piece_size
from adamnx.guard import ROW, TENSOR, counts_on_device
from adamnx.plan import Bucket, StepPlan, device_coefficients
from adamnx.quantized import BLOCK, local_tensors, update_8bit
from adamnx.update import Weights, update, update_copies

__all__ = ["execute", "execute_8bit", "local_weights"]


def execute(plan: StepPlan) -> None:
    hp = plan.hp
    lr: Any = hp.lr
    if isinstance(lr, Tensor) and not plan.on_device and not plan.differentiable:  # differentiable: a graph to lr
        lr = lr.item()
    for bucket in plan.buckets:
        step_lr = lr.to(bucket.math_dtype) if isinstance(lr, Tensor) else lr  # lr·λ in the math dtype, not lr's
        if bucket.scales is not None:
            execute_8bit(plan, bucket, range(len(bucket.params)), step_lr)
            continue
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
    if plan.on_device or guard is None or guard.layouts[i] == TENSOR:
        weights = _whole_weights(plan, bucket, i)
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


def execute_8bit(plan: StepPlan, bucket: Bucket, indices: Iterable[int], lr: Any, grad_factor: float = 1.0) -> None:
    """Tensors ``indices`` of a bucket with 8-bit moments (:func:`adamnx.quantized.update_8bit`), whole (a piece would
    cut the quantization blocks), with weights in the plan's form. ``grad_factor``: scales the gradients (a fused
    executor's unscale)."""
    assert bucket.scales is not None
    hp = plan.hp
    sign = -grad_factor if hp.maximize else grad_factor
    for i in indices:
        weights = local_weights(plan, bucket, i)
        # (a DTensor param's local parts: blocks are per shard)
        tensors = local_tensors(bucket.params[i], bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i],
                                *bucket.scales[i])  # fmt: skip
        if sign != 1.0:
            tensors[1] = tensors[1].to(bucket.math_dtype) * sign
        for (p, g, m, v, m_scales, v_scales), piece_weights in _block_pieces(tensors, weights, plan.on_device):
            update_8bit(
                p, g, m, v, m_scales, v_scales, piece_weights, lr, hp.weight_decay, hp.eps,
                dtype=bucket.math_dtype, stochastic=bucket.stochastic,
            )  # fmt: skip


def _whole_weights(plan: StepPlan, bucket: Bucket, i: int) -> Weights:
    """Tensor ``i``'s weights for the whole tensor, in the plan's form: from its step (or counts) on the device, else
    scalars, one set per row, or one per element."""
    guard = bucket.guard
    if plan.on_device:
        step = bucket.steps[i] if guard is None else guard.device_counts(i, bucket.steps[i]).clamp_min(1)
        return device_coefficients(step, bucket.betas, bucket.math_dtype)
    if guard is None or guard.layouts[i] == TENSOR:
        return bucket.scalar_coefficients(i)
    return bucket.row_coefficients(i) if guard.layouts[i] == ROW else bucket.element_coefficients(i)


def local_weights(plan: StepPlan, bucket: Bucket, i: int) -> Weights:
    """Tensor ``i``'s weights for the whole tensor, as :func:`_whole_weights` gives them, or for a DTensor param (its
    lags are per element) for this rank's shard: computed from its local lags, since the 8-bit executors update local
    parts (:func:`adamnx.quantized.local_tensors`)."""
    guard = bucket.guard
    if guard is None or not is_dtensor(guard.lags[i]):
        return _whole_weights(plan, bucket, i)
    lag = local_part(guard.lags[i])
    if plan.on_device:
        counts = counts_on_device(lag, local_part(bucket.steps[i])).clamp_min(1)
        return device_coefficients(counts, bucket.betas, bucket.math_dtype)
    return guard.coefficients_of(i, lag)


def _block_pieces(tensors: list[Tensor], weights: Weights, on_device: bool) -> list[tuple[list[Tensor], Weights]]:
    """A param with 8-bit moments in pieces of whole quantization blocks (p, g, m, v as 1-D slices, their scales
    sliced alike, weights per element sliced with them): blocks are independent, and pieces that stay in cache are
    several times faster on the CPU. Whole on a device, or when the tensors are not contiguous."""
    param, m_scales, v_scales = tensors[0], tensors[4], tensors[5]
    size = piece_size(param)
    if on_device or param.numel() <= size or not all(t.is_contiguous() for t in tensors[:4]):
        return [(tensors, weights)]
    flat = [t.view(-1) for t in tensors[:4]]
    per_element = [isinstance(w, Tensor) and w.dim() > 0 for w in weights]
    flat_weights = [w.expand(param.shape).reshape(-1) if e else w for w, e in zip(weights, per_element)]
    out = []
    for start in range(0, param.numel(), size):
        end = min(start + size, param.numel())
        blocks = slice(start // BLOCK, -(-end // BLOCK))
        piece = [t[start:end] for t in flat] + [m_scales[blocks], v_scales[blocks]]
        out.append((piece, Weights(*(w[start:end] if e else w for w, e in zip(flat_weights, per_element)))))
    return out
