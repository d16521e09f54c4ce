"""The multi-tensor executor: :func:`adamnx.update.foreach_update` on lists of tensors, a ``_foreach_`` kernel per
operation. Also ``capturable=True`` (coefficients computed on the device from the step tensors: no host sync)."""

from __future__ import annotations

import torch
from torch import Tensor

from adamnx.backends._pieces import buckets_of_pieces, in_row_pieces
from adamnx.guard import ROW, TENSOR
from adamnx.plan import Bucket, StepPlan, device_coefficients
from adamnx.update import foreach_update, foreach_update_copies

__all__ = ["execute"]


def execute(plan: StepPlan) -> None:
    hp = plan.hp
    if isinstance(hp.lr, Tensor) and not plan.capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    for bucket in plan.buckets:
        grads = torch._foreach_neg(bucket.grads) if hp.maximize else bucket.grads
        tensors = (bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs)
        lr = hp.lr.to(bucket.math_dtype) if isinstance(hp.lr, Tensor) else hp.lr  # lr·λ in the math dtype
        for lists in _lists(plan, bucket, tensors):
            if bucket.wider:
                foreach_update_copies(
                    *lists, lr, hp.weight_decay, hp.eps, dtype=bucket.math_dtype, stochastic=bucket.stochastic
                )
            else:
                foreach_update(*lists, lr, hp.weight_decay, hp.eps)


def _lists(plan: StepPlan, bucket: Bucket, tensors: tuple[list[Tensor], ...]) -> list[tuple[list, ...]]:
    """Lists of tensors (or of pieces of them, for updates on wider copies) followed by their coefficient lists
    (1 − β1_t, β̂2_t, 1 − β̂2_t), in the form the plan gives them; in the tensors' order, so that stochastic rounding
    draws in the same order as the for-loop."""
    n = len(tensors[0])
    guard = bucket.guard
    if plan.on_device:
        if guard is None:  # one vectorised evaluation for the whole bucket: N 0-d weights, no host sync
            w1, w2 = device_coefficients(torch.stack(bucket.steps), bucket.betas, bucket.math_dtype)
            weights = (list(w1.unbind()), list((1 - w2).unbind()), list(w2.unbind()))
        else:  # every coordinate's coefficients evaluated on the device
            shaped = [
                device_coefficients(
                    guard.device_counts(i, bucket.steps[i]).clamp_min(1), bucket.betas, bucket.math_dtype
                )
                for i in range(n)
            ]
            weights = ([w for w, _ in shaped], [1 - w for _, w in shaped], [w for _, w in shaped])
        return _maybe_pieces(bucket, tensors, weights)
    if guard is None:
        scalars = [bucket.scalar_coefficients(i) for i in range(n)]
        return _maybe_pieces(bucket, tensors, tuple(map(list, zip(*scalars))))
    out: list[tuple[list, ...]] = []
    for kind, indices in _runs([_kind(guard.layouts[i], bucket.wider) for i in range(n)]):
        selected = tuple([lst[i] for i in indices] for lst in tensors)
        if kind == TENSOR:
            scalars = [bucket.scalar_coefficients(i) for i in indices]
            out += _maybe_pieces(bucket, selected, tuple(map(list, zip(*scalars))))
        elif kind == ROW:  # in pieces of whole rows: small temporaries (g·w2 per row)
            rows = tuple(map(list, zip(*(bucket.row_coefficients(i) for i in indices))))
            out += buckets_of_pieces(selected, rows, cut=in_row_pieces)
        else:  # per element, in pieces: the gathered coefficients stay bounded
            lags = [guard.expanded(i, bucket.params[i]) for i in indices]
            for *pieces, lag_pieces, owners in buckets_of_pieces((*selected, lags), (indices,)):
                gathered = [bucket.element_coefficients(i, lag) for i, lag in zip(owners, lag_pieces)]
                out.append((*pieces, *map(list, zip(*gathered))))
    return out


def _kind(layout: str, wider: bool) -> str:
    """How a tensor's coefficients go to the kernels: scalars, per row (broadcast), or per element."""
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


def _maybe_pieces(bucket: Bucket, tensors: tuple[list[Tensor], ...], weights: tuple[list, ...]) -> list[tuple]:
    """Lists of cache-sized pieces (at most a piece's elements per list): faster, and small temporaries."""
    return list(buckets_of_pieces(tensors, weights))
