"""The multi-tensor executor: :func:`adamnx.update.foreach_update` on lists of tensors, a ``_foreach_`` kernel per
operation, over lists of cache-sized pieces. Also ``capturable=True`` (coefficients computed on the device from the
step tensors: no host sync)."""

from __future__ import annotations

import torch
from torch import Tensor

from adamnx.backends import loop
from adamnx.backends._pieces import buckets_of_pieces, host_moment_noise, in_row_pieces
from adamnx.guard import ROW, TENSOR
from adamnx.plan import Bucket, StepPlan, device_coefficients
from adamnx.update import Weights, foreach_update, foreach_update_copies

__all__ = ["execute"]

Lists = tuple[list[list[Tensor]], Weights]  # (params, grads, exp_avgs, exp_avg_sqs), and their weights


def execute(plan: StepPlan) -> None:
    hp = plan.hp
    if isinstance(hp.lr, Tensor) and not plan.capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    for bucket in plan.buckets:
        lr = hp.lr.to(bucket.math_dtype) if isinstance(hp.lr, Tensor) else hp.lr  # lr·λ in the math dtype
        if bucket.scales is not None:  # 8-bit moments: tensor by tensor (no _foreach_ form of the blocks)
            loop.execute_8bit(plan, bucket, range(len(bucket.params)), lr)
            continue
        grads = list(torch._foreach_neg(bucket.grads)) if hp.maximize else bucket.grads
        tensors = [bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs]
        noise = host_moment_noise(plan, bucket)
        for (params, gs, exp_avgs, exp_avg_sqs), weights in _lists(plan, bucket, tensors):
            if bucket.wider:
                foreach_update_copies(
                    params, gs, exp_avgs, exp_avg_sqs, weights, lr, hp.weight_decay, hp.eps,
                    dtype=bucket.math_dtype, stochastic=bucket.stochastic, noise=noise,
                )  # fmt: skip
            else:
                foreach_update(params, gs, exp_avgs, exp_avg_sqs, weights, lr, hp.weight_decay, hp.eps)


def _lists(plan: StepPlan, bucket: Bucket, tensors: list[list[Tensor]]) -> list[Lists]:
    """Lists of pieces of the tensors with their weights in the form the plan gives them; in the tensors' order, so
    that stochastic rounding draws in the same order as the for-loop."""
    n = len(tensors[0])
    guard = bucket.guard
    if plan.on_device:
        if guard is None:  # one vectorised evaluation for the whole bucket: N 0-d weights, no host sync
            stacked = device_coefficients(torch.stack(bucket.steps), bucket.betas, bucket.math_dtype)
            weights = Weights(*(list(w.unbind()) for w in stacked))
        else:  # every coordinate's coefficients evaluated on the device
            shaped = [
                device_coefficients(
                    guard.device_counts(i, bucket.steps[i]).clamp_min(1), bucket.betas, bucket.math_dtype
                )
                for i in range(n)
            ]
            weights = Weights(*map(list, zip(*shaped)))
        return _in_pieces(tensors, weights)
    if guard is None:
        return _in_pieces(tensors, Weights(*map(list, zip(*(bucket.scalar_coefficients(i) for i in range(n))))))
    out: list[Lists] = []
    for kind, indices in _runs([_kind(guard.layouts[i], bucket.wider) for i in range(n)]):
        selected = [[lst[i] for i in indices] for lst in tensors]
        if kind == TENSOR:
            out += _in_pieces(selected, Weights(*map(list, zip(*(bucket.scalar_coefficients(i) for i in indices)))))
        elif kind == ROW:  # in pieces of whole rows: small temporaries (g·w2 per row)
            rows = Weights(*map(list, zip(*(bucket.row_coefficients(i) for i in indices))))
            out += [(lists, Weights(*w)) for lists, w in buckets_of_pieces(selected, rows, cut=in_row_pieces)]
        else:  # per element, in pieces: the gathered weights stay small
            lags = [guard.expanded(i, bucket.params[i]) for i in indices]
            for (*pieces, lag_pieces), (owners,) in buckets_of_pieces([*selected, lags], [indices]):
                gathered = [bucket.element_coefficients(i, lag) for i, lag in zip(owners, lag_pieces)]
                out.append((pieces, Weights(*map(list, zip(*gathered)))))
    return out


def _in_pieces(tensors: list[list[Tensor]], weights: Weights) -> list[Lists]:
    """Lists of cache-sized pieces (at most a piece's elements per list): faster, and small temporaries."""
    return [(lists, Weights(*w)) for lists, w in buckets_of_pieces(tensors, weights)]


def _kind(layout: str, wider: bool) -> str:
    """How a tensor's weights go to the kernels: scalars, per row (broadcast), or per element."""
    if layout == ROW and wider:  # pieces of a wider update need per-element weights
        return "element"
    return layout


def _runs(kinds: list[str]) -> list[tuple[str, list[int]]]:
    """Consecutive tensors of the same kind."""
    runs: list[tuple[str, list[int]]] = []
    for i, kind in enumerate(kinds):
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(i)
        else:
            runs.append((kind, [i]))
    return runs
