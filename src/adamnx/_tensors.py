"""Tensor helpers shared by the implementations (functional.py's for-loop and foreach, _fused.py's kernels).

Nothing here updates an optimizer: grouping tensors for multi-tensor kernels, the dtype an update is computed in,
the coefficients of a step read on the host, dense 1-D views, and stochastic rounding to bf16.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict, defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

from adamnx.schedule import coefficients

__all__ = [
    "BY_ELEMENT",
    "BY_ROW",
    "ON_STEP",
    "GatheredCoordinates",
    "KnownCounts",
    "advance_counts",
    "advance_counts_",
    "advance_known_counts_",
    "coordinate_table",
    "count_coefficients",
    "dense_1d_views",
    "forget_counts",
    "group_by_device_and_dtype",
    "host_coefficients",
    "known_counts",
    "math_dtype",
    "note_counts",
    "observe_counts",
    "off_step_coordinates",
    "row_coefficients",
    "stochastic_round_to_bf16",
]


def stochastic_round_to_bf16(x: Tensor) -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: up with probability equal to the distance to the lower value.

    Adds 16 random bits below bf16's last mantissa bit, then truncates; unbiased (E[round(x)] = x), so updates
    smaller than half a bf16 ulp still move the parameter on average instead of being rounded away.
    """
    bits = x.to(torch.float32).view(torch.int32)  # float64 math (a float64 state): to float32 first (nearest)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits 0: the cast is exact


def math_dtype(param: Tensor, state: Tensor) -> torch.dtype:
    """The dtype every path computes a tensor's update in: the wider of the param's and the state's, and at least
    float32 (fp16 would round eps = 1e-8 to 0). Complex tensors are updated through their real views."""
    dtype = _MATH_DTYPES.get((param.dtype, state.dtype))
    return dtype if dtype is not None else _wider_real_dtype(param.dtype, state.dtype)


def _wider_real_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    dtype = torch.promote_types(torch.promote_types(a, b), torch.float32)
    return dtype.to_real() if dtype.is_complex else dtype


# Precomputed: the step asks for every tensor (a table, not functools.cache, which torch.compile warns about).
_KNOWN = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
_MATH_DTYPES = {(a, b): _wider_real_dtype(a, b) for a in _KNOWN for b in _KNOWN}


def group_by_device_and_dtype(*tensor_lists: list[Tensor]) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists into sublists whose param shares a device and dtype (foreach kernels need that)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(tensor_lists[0]):
        buckets[(p.device, p.dtype)].append(i)
    return [tuple([lst[i] for i in idx] for lst in tensor_lists) for idx in buckets.values()]


# Host coefficients are evaluated a block of steps at a time, always over the same aligned block: a step sits at the
# same place of the same vectorised evaluation whether a group's scalar or a per-coordinate table asks for it, so
# both get the same bits (a scalar evaluation with math.exp differs from a vectorised one in the last bit of ~5%).
COEFFICIENT_BLOCK = 4096


def _coefficient_block(block: int, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """float64 ``(1 − β1_t, 1 − β̂2_t)`` for t in [block·B, (block + 1)·B), from :func:`coefficients`.

    t = 0 stands for a coordinate that has not started (per_coordinate_steps) and gets t = 1's values (1, 1)."""
    steps = torch.arange(block * COEFFICIENT_BLOCK, (block + 1) * COEFFICIENT_BLOCK, dtype=torch.float64)
    if block == 0:
        steps[0] = 1.0
    w1, w2 = coefficients(steps, (beta1, beta2))
    return w1, w2


_cached_block = functools.lru_cache(maxsize=16)(_coefficient_block)


@functools.lru_cache(maxsize=4096)
def host_coefficients(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Python-float coefficients for a step read from a CPU counter; cached since a group shares its step."""
    block, index = divmod(int(step), COEFFICIENT_BLOCK)
    w1, w2 = _cached_block(block, beta1, beta2)
    return float(w1[index]), float(w2[index])


class _Table:
    """Rows (1 − β1_t, β̂2_t, 1 − β̂2_t) in one math dtype on one device, for t = 0, 1, ..., len − 1."""

    def __init__(self, beta1: float, beta2: float, dtype: torch.dtype, device: torch.device) -> None:
        self.betas, self.dtype, self.device = (beta1, beta2), dtype, device
        self.rows = torch.empty(3, 0, dtype=dtype, device=device)
        # Past some t the rounded coefficients stop changing (1 − β1_t reaches 1 − β1, 1 − β̂2_t underflows to 0:
        # both fall monotonically); the table ends there and longer counts read its last row.
        self.limit = self._rounded(torch.tensor([2.0**53], dtype=torch.float64))
        self.complete = False

    def _rounded(self, steps: Tensor) -> Tensor:
        return self._rows(*coefficients(steps, self.betas))

    def _rounded_block(self, block: int) -> Tensor:
        return self._rows(*_coefficient_block(block, *self.betas))

    def _rows(self, w1: Tensor, w2: Tensor) -> Tensor:
        return torch.stack([w1, 1 - w2, w2]).to(self.dtype)  # β̂2 formed in float64, then rounded (as elsewhere)

    def extend_to(self, length: int) -> None:
        blocks, have = [], self.rows.shape[1]
        while not self.complete and have < length:
            block = self._rounded_block(have // COEFFICIENT_BLOCK)
            blocks.append(block)
            have += COEFFICIENT_BLOCK
            self.complete = bool((block[:, -1] == self.limit[:, 0]).all())
        if blocks:
            self.rows = torch.cat([self.rows, torch.cat(blocks, dim=1).to(self.device)], dim=1)


_TABLES: OrderedDict[tuple, _Table] = OrderedDict()
_MAX_TABLES = 8  # betas that change every step (a β2 schedule) must not pile tables up


# The longest table kept (48 MB in float32). Past it a table is sized by the longest count (one reduction over the
# counts), and counts longer still get their coefficients evaluated per element instead: for β2 ≥ 0.999 the rounded
# coefficients keep changing for 10⁸ steps and more, and a table that long would not fit in memory.
MAX_TABLE_ROWS = 1 << 22
# A table built from scratch at a step past this is sized by the counts, not the step (betas that change every step
# would otherwise rebuild a table as long as the run at every step).
_FRESH_BY_STEP = 1 << 16


def coordinate_table(
    max_step: float, counts: list[Tensor], beta1: float, beta2: float, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """The per-coordinate coefficients for ``counts`` (int32, each at most ``max_step``) after this step: a (3, L)
    tensor of rows (1 − β1_t, β̂2_t, 1 − β̂2_t) in ``dtype`` on ``device``, row t for count t (row 0, a coordinate
    that has not started: t = 1's values); None when the counts are too long for a table (see MAX_TABLE_ROWS): the
    caller then evaluates :func:`coefficients` per element (:func:`count_coefficients` with the betas).

    Built from the same blocks as :func:`host_coefficients`, so a coordinate whose count equals its tensor's step
    gets exactly the tensor's coefficients. L covers every count, except past the count from which the rounded
    coefficients no longer change: there the table ends and a kernel reads row L − 1 for every longer count. It
    grows by doubling (a few copies in a whole run), so kernels gather instead of evaluating exp/expm1 per element.
    """
    key = (beta1, beta2, dtype, device)
    table = _TABLES.pop(key, None) or _Table(beta1, beta2, dtype, device)
    _TABLES[key] = table
    while len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    length, longest = table.rows.shape[1], int(max_step)
    if longest >= length and not table.complete:
        if longest >= MAX_TABLE_ROWS or (length == 0 and longest >= _FRESH_BY_STEP):
            longest = min(longest, 1 + max((int(c.max()) for c in counts if c.numel()), default=0))
        if longest >= length:
            table.extend_to(min(max(longest + 1, 2 * length), MAX_TABLE_ROWS))
        if longest >= table.rows.shape[1] and not table.complete:
            return None  # longer than the longest table, and the coefficients still change there
    return table.rows


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


# --------------------------------------------------------------------------- per-coordinate counts
# A coordinate's count is 0 until its first non-zero gradient, then advances by one each step (saturating at
# int32's maximum): its coefficients are those of t = count, row `count` of coordinate_table (row 0: t = 1's).

MAX_COUNT = 2**31 - 1


def advance_counts(count: Tensor, grad: Tensor) -> Tensor:
    """The counts after this step, out of place (the fused kernels write them back last, with everything else)."""
    return count + (torch.logical_or(grad, count) & (count != MAX_COUNT))


def advance_counts_(count: Tensor, grad: Tensor, may_saturate: bool) -> Tensor:
    """advance_counts in place, in two passes; the saturation test only when a count can reach it (step ≥ 2^31 − 1)."""
    started = torch.logical_or(grad, count)
    if may_saturate:
        started &= count != MAX_COUNT
    return count.add_(started)


def count_coefficients(
    source: Tensor | tuple[float, float], count: Tensor, dtype: torch.dtype, clamp: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(1 − β1_t, β̂2_t, 1 − β̂2_t) of each coordinate, shaped like ``count``, in ``dtype``: gathered from a
    coordinate_table (``source`` its rows), or, where the counts are too long for one, evaluated per element by
    :func:`coefficients` (``source`` the betas).

    ``clamp=False`` when every count is known to lie inside the table (its length exceeds the step): saves a pass.
    """
    if not isinstance(source, Tensor):
        w1, w2 = coefficients(count.clamp_min(1).to(torch.float64), source)
        return w1.to(dtype), (1 - w2).to(dtype), w2.to(dtype)  # β̂2 formed in float64, as in the table
    index = count.reshape(-1)
    if clamp:  # a complete table is shorter than the longest counts
        index = index.clamp(0, source.shape[1] - 1)
    w1, beta2_hat, w2 = (row.index_select(0, index).view(count.shape) for row in source)
    return w1, beta2_hat, w2


# --------------------------------------------------------------------------- what is known about a tensor's counts
# Counts are rarely arbitrary. In a dense layer every coordinate starts at step 1 (but for a few whose first
# gradient was exactly zero), so the counts equal the tensor's step; in an embedding a row starts as a whole, so
# counts are constant along each row. A step that knows this updates the tensor with its own coefficients and the
# few exceptions apart (ON_STEP), or gathers one set of coefficients per row (BY_ROW), instead of one per element
# (BY_ELEMENT); all give the same bits, since the table's row t is the tensor's own coefficients at step t.
# What is known is kept per count tensor together with the versions of the count and step tensors it was noted at:
# any other in-place write to either (a user's edit) makes it unknown, and the counts are looked at again.

ON_STEP, BY_ROW, BY_ELEMENT = "on step", "by row", "by element"

# Tensors smaller than this go element by element: looking at their counts costs more than it saves.
MIN_TRACKED_NUMEL = 1 << 14
# Rows shorter than this gather nearly as many coefficients as elements: such tensors go element by element.
_MIN_ROW = 8
# ON_STEP takes at most one coordinate in this many as an exception (each is gathered, updated and scattered).
_EXCEPTION_RATIO = 32


class KnownCounts(NamedTuple):
    """How a tensor's counts vary: ``kind``, and with it ``exceptions`` (ON_STEP: the flat indices of the
    coordinates whose count is not the step, or None when there are none) or ``rows`` (BY_ROW: each row's count,
    1-D int32, or None when not kept)."""

    kind: str
    exceptions: Tensor | None = None
    rows: Tensor | None = None


class _Known:
    __slots__ = ("count", "count_version", "counts", "memory", "step", "step_version")

    def __init__(self, count: weakref.ref, step: Tensor) -> None:
        self.count, self.step = count, step
        self.counts, self.count_version, self.step_version, self.memory = KnownCounts(BY_ELEMENT), -1, -1, 0


# Keyed by id(count), each entry with a weak reference to its count tensor that removes it when the tensor goes
# (a dict of ids is several times faster to look up than a WeakIdKeyDictionary, with hundreds of tensors a step).
_KNOWN_COUNTS: dict[int, _Known] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    known = _KNOWN_COUNTS.get(key)
    if known is not None and known.count is ref:
        del _KNOWN_COUNTS[key]


def known_counts(count: Tensor, step: Tensor) -> KnownCounts | None:
    """How ``count``'s values vary, as noted after the last step, if neither it nor ``step`` has changed since;
    None when unknown."""
    known = _KNOWN_COUNTS.get(id(count))
    if known is None or known.count() is not count or known.step is not step:
        return None
    try:
        unchanged = known.count_version == count._version and known.step_version == step._version
    except RuntimeError:  # inference tensors keep no version: nothing can be known
        return None
    # `.data = other` swaps the memory but keeps the version: the address tells
    return known.counts if unchanged and known.memory == count.data_ptr() else None


def forget_counts(count: Tensor) -> None:
    """Forget what was noted of ``count`` (the next step looks at it again)."""
    known = _KNOWN_COUNTS.get(id(count))
    if known is not None and known.count() is count:
        del _KNOWN_COUNTS[id(count)]


def note_counts(
    count: Tensor, step: Tensor, kind: str, exceptions: Tensor | None = None, rows: Tensor | None = None
) -> None:
    """Note how ``count`` varies, once this step has written it and ``step`` (see known_counts)."""
    if type(count) is not Tensor:  # DTensors and other subclasses are not tracked
        return
    key = id(count)
    known = _KNOWN_COUNTS.get(key)
    if known is None or known.count() is not count or known.step is not step:
        known = _Known(weakref.ref(count, functools.partial(_forget, key)), step)
        _KNOWN_COUNTS[key] = known
    try:
        versions = count._version, step._version
    except RuntimeError:  # inference tensors keep no version
        versions = -1, -1
    known.counts, (known.count_version, known.step_version) = KnownCounts(kind, exceptions, rows), versions
    known.memory = count.data_ptr()


def _has_rows(count: Tensor) -> bool:
    return count.dim() >= 2 and count.is_contiguous() and count.numel() >= _MIN_ROW * count.shape[0] > 0


def off_step_coordinates(count: Tensor, step: float) -> Tensor | None:
    """The flat indices of the coordinates whose count differs from ``step``, when they are few enough to be
    ON_STEP's exceptions (None otherwise, or when the counts are not one contiguous block)."""
    if not count.is_contiguous() or not count.numel():
        return None
    off = (count.view(-1) != step).nonzero().squeeze(1)
    return off if off.numel() * _EXCEPTION_RATIO <= count.numel() else None


def observe_counts(count: Tensor, step: float) -> KnownCounts:
    """How ``count`` varies at a tensor step of ``step``, looked at (a pass or two over the counts)."""
    off = off_step_coordinates(count, step)
    if off is not None:
        return KnownCounts(ON_STEP, off if off.numel() else None)
    if _has_rows(count):
        rows = count.view(count.shape[0], -1)
        if bool((rows == rows[:, :1]).all()):
            return KnownCounts(BY_ROW, rows=rows[:, 0].clone())
    return KnownCounts(BY_ELEMENT)


def advance_known_counts_(count: Tensor, grad: Tensor, known: KnownCounts | None, step: float) -> KnownCounts:
    """advance_counts_ for a step after which the tensor's step is ``step``, given what was known of the counts
    before it (from known_counts, or None): returns how the new counts vary.

    Known ON_STEP (past the first step): every coordinate but the exceptions has started and advances, with no
    pass over the gradient. Known BY_ROW: one count per row; a row that has not started starts when its gradient
    is non-zero, and a row whose gradient is zero only in part makes the tensor BY_ELEMENT from then on.
    """
    # near saturation, a DTensor, or too small for the fast paths to pay: element by element
    if step >= MAX_COUNT - 1 or type(count) is not Tensor or count.numel() < MIN_TRACKED_NUMEL:
        advance_counts_(count, grad, may_saturate=step >= MAX_COUNT - 1)
        return KnownCounts(BY_ELEMENT)
    known = known if known is not None else observe_counts(count, step - 1)
    kind, exceptions = known.kind, known.exceptions
    if kind == ON_STEP and step > 1:  # counts written, not read (the exceptions' advanced apart)
        if exceptions is None:
            count.fill_(int(step))
            return KnownCounts(ON_STEP)
        flat = count.view(-1)
        new = advance_counts(flat.index_select(0, exceptions), grad.reshape(-1).index_select(0, exceptions))
        flat.fill_(int(step)).index_copy_(0, exceptions, new)
        return KnownCounts(ON_STEP, exceptions)
    first = kind == ON_STEP  # the first step (every count 0): the exceptions are found after it
    row_counts = None
    if kind != BY_ELEMENT and _has_rows(count):
        rows = count.view(count.shape[0], -1)
        before = known.rows if known.rows is not None else rows[:, 0]  # kept: no strided read of the counts
        row_counts = _advance_row_counts(before, grad.reshape(rows.shape))
        if row_counts is not None:
            started = row_counts.nonzero().squeeze(1)  # rows that have not started keep their zeros
            if started.numel() * 2 < row_counts.numel():
                rows.index_copy_(0, started, row_counts[started, None].expand(-1, rows.shape[1]))
            else:
                rows.copy_(row_counts[:, None].expand(rows.shape))
    if row_counts is None:
        advance_counts_(count, grad, may_saturate=False)
    if first:  # the coordinates whose first gradient was zero are the exceptions, if they are few
        off = off_step_coordinates(count, step)
        if off is not None:
            return KnownCounts(ON_STEP, off if off.numel() else None)
    return KnownCounts(BY_ROW, rows=row_counts) if row_counts is not None else KnownCounts(BY_ELEMENT)


def _advance_row_counts(row_counts: Tensor, grad_rows: Tensor) -> Tensor | None:
    """Each row's count after this step (rows that have started advance), or None when a row that has not
    started gets a gradient that is zero only in part (its coordinates would then start at different steps)."""
    advanced = row_counts + 1
    not_started = (row_counts == 0).nonzero().squeeze(1)
    if not_started.numel():
        few = not_started.numel() * 8 < row_counts.numel()
        rows = grad_rows.index_select(0, not_started) if few else grad_rows
        # A row starts when it is not all zero: its largest or smallest value is not 0 (NaN included). Two
        # reductions and no temporary; only the rows that start are then checked element by element.
        starts = (rows.amax(1) != 0) | (rows.amin(1) != 0)
        if not few:
            starts = starts.index_select(0, not_started)
        starting = not_started[starts]
        if starting.numel() and not bool(grad_rows.index_select(0, starting).ne(0).all()):
            return None
        advanced.index_copy_(0, not_started, starts.to(advanced.dtype))
    return advanced


def row_coefficients(
    source: Tensor | tuple[float, float], row_counts: Tensor, dtype: torch.dtype, clamp: bool, ndim: int
) -> tuple[Tensor, Tensor, Tensor]:
    """count_coefficients for BY_ROW counts: one set per row, shaped (rows, 1, ..., 1) to broadcast over the param."""
    shape = (-1,) + (1,) * (ndim - 1)
    w1, beta2_hat, w2 = count_coefficients(source, row_counts, dtype, clamp)
    return w1.view(shape), beta2_hat.view(shape), w2.view(shape)


class GatheredCoordinates:
    """Copies of some coordinates (flat ``indices``) of a tensor's (param, grad, exp_avg, exp_avg_sq, count), to
    update apart from the rest (ON_STEP's exceptions) and write back."""

    def __init__(self, views: list[Tensor], indices: Tensor) -> None:
        self.views, self.indices = views, indices
        self.copies = [view.index_select(0, indices) for view in views]

    @classmethod
    def save(cls, tensors: list[Tensor], indices: Tensor) -> GatheredCoordinates | None:
        """None when the five tensors are not dense blocks of one layout (flat indices need one)."""
        views = dense_1d_views(tensors)
        return None if views is None else cls(views, indices)

    def write_back(self, counts: bool) -> None:
        """Write the param, the moments and, with ``counts``, the counts back (the grad is only read)."""
        for i in (0, 2, 3, 4) if counts else (0, 2, 3):
            self.views[i].index_copy_(0, self.indices, self.copies[i])
