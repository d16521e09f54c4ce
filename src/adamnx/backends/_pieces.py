"""Cutting tensors into aligned 1-D pieces, for the host executors' updates on copies and per-element coefficients:
bounded temporaries, and pieces small enough to stay in cache on the CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from adamnx.plan import Bucket, StepPlan
from adamnx.update import moment_noise

# The coefficients that go with a tensor: a tuple (adamnx.update.Weights, or empty), rebuilt piece by piece.
C = TypeVar("C", bound=tuple)


def _rebuilt(coefficients: C, values: list[Any]) -> C:
    make = getattr(type(coefficients), "_make", None)  # a NamedTuple keeps its type
    return cast(C, make(values) if make is not None else tuple(values))


__all__ = ["buckets_of_pieces", "dense_1d_views", "host_moment_noise", "in_pieces", "in_row_pieces", "piece_size"]

# Elements per piece (three float32 copies of a piece exist at a time). On the CPU small pieces stay in cache (12 MB)
# and are faster than whole tensors; an accelerator pays ~12 launches per piece, so its pieces are larger (768 MB of
# temporaries at most).
_PIECE = {"cpu": 1 << 20}
_ACCELERATOR_PIECE = 1 << 26


def piece_size(tensor: Tensor) -> int:
    return _PIECE.get(tensor.device.type, _ACCELERATOR_PIECE)


def host_moment_noise(plan: StepPlan, bucket: Bucket) -> Tensor | None:
    """A step's shared random bits for a bucket's bf16 moments on the CPU (:func:`adamnx.update.moment_noise`, whose
    period divides every piece size: a tensor cut in pieces draws what it draws whole); None elsewhere (on a device
    the generator is fast: one draw per element)."""
    moments = bucket.exp_avgs[0]
    if plan.on_device or moments.dtype != torch.bfloat16 or moments.device.type != "cpu":
        return None
    return moment_noise(moments.device)


def dense_1d_views(tensors: list[Tensor]) -> list[Tensor] | None:
    """1-D views over the same memory when all tensors are dense blocks with identical strides, else None.

    A dense, non-overlapping tensor (contiguous, channels_last, ...) covers one block of memory; walking that
    block in order visits corresponding elements of tensors that share strides, so 1-D views stay aligned.
    """
    first = tensors[0]
    if any(t.stride() != first.stride() or t.shape != first.shape for t in tensors):
        return None
    if first.is_contiguous():
        return [t.view(-1) for t in tensors]
    sizes_strides = sorted((st, sz) for st, sz in zip(first.stride(), first.shape) if sz != 1)
    expected = 1
    for stride, size in sizes_strides:
        if stride != expected:
            return None
        expected *= size
    return [t.as_strided((t.numel(),), (1,)) for t in tensors]


def in_pieces(tensors: Sequence[Tensor], coefficients: C) -> list[tuple[list[Tensor], C]]:
    """Aligned 1-D pieces of at most a piece's elements of ``tensors`` (which share a layout) and of the coefficients
    shaped like them; the tensors whole when they are small or not one dense block."""
    shaped = [i for i, c in enumerate(coefficients) if isinstance(c, Tensor) and c.dim()]
    piece = piece_size(tensors[0])
    views = dense_1d_views([*tensors, *(coefficients[i] for i in shaped)]) if tensors[0].numel() > piece else None
    if views is None:
        return [(list(tensors), coefficients)]
    pieces = []
    for start in range(0, tensors[0].numel(), piece):
        sliced = [view[start : start + piece] for view in views]
        coeffs = list(coefficients)
        for i, coefficient_piece in zip(shaped, sliced[len(tensors) :]):
            coeffs[i] = coefficient_piece
        pieces.append((sliced[: len(tensors)], _rebuilt(coefficients, coeffs)))
    return pieces


def in_row_pieces(tensors: Sequence[Tensor], coefficients: C) -> list[tuple[list[Tensor], C]]:
    """Pieces of whole rows (slices along the first dimension, at most a piece's elements each) of ``tensors`` and of
    the coefficients shaped per row (R, 1, ..., 1): the temporaries of an update with weights per row stay small."""
    first = tensors[0]
    if first.dim() == 0 or first.numel() == 0:
        return [(list(tensors), coefficients)]
    rows = max(1, piece_size(first) // (first.numel() // first.shape[0]))
    if first.shape[0] <= rows:
        return [(list(tensors), coefficients)]
    return [
        (
            [t[start : start + rows] for t in tensors],
            _rebuilt(
                coefficients,
                [c[start : start + rows] if isinstance(c, Tensor) and c.dim() else c for c in coefficients],
            ),
        )
        for start in range(0, first.shape[0], rows)
    ]


def buckets_of_pieces(
    tensors: Sequence[list[Tensor]], coefficients: Sequence[list], cut: Callable = in_pieces
) -> Iterator[tuple[list[list[Tensor]], list[list]]]:
    """Lists of pieces (``cut``: in_pieces, or in_row_pieces), at most a piece's elements per list, with their
    per-tensor coefficients (``coefficients[k][i]``: coefficient k of tensor i): (lists of tensors, lists of
    coefficients)."""
    bucket: list[tuple[list[Tensor], tuple]] = []
    size, budget = 0, piece_size(tensors[0][0])
    for i in range(len(tensors[0])):
        for piece, coeffs in cut([lst[i] for lst in tensors], tuple(c[i] for c in coefficients)):
            if bucket and size + piece[0].numel() > budget:
                yield _transposed(bucket, len(tensors), len(coefficients))
                bucket, size = [], 0
            bucket.append((piece, coeffs))
            size += piece[0].numel()
    if bucket:
        yield _transposed(bucket, len(tensors), len(coefficients))


def _transposed(bucket: list[tuple[list[Tensor], tuple]], n_tensors: int, n_coefficients: int):
    tensors = [[piece[k] for piece, _ in bucket] for k in range(n_tensors)]
    coefficients = [[coeffs[k] for _, coeffs in bucket] for k in range(n_coefficients)]
    return tensors, coefficients
