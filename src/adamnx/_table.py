"""The step coefficients as the executors read them: Python floats for a step, or a table indexed by count.

:func:`adamnx.schedule.coefficients` derives them; this module only evaluates it in aligned blocks and keeps the
results, so that every form of a coefficient (a float for a tensor's step, a table row for a coordinate's count) has
the same bits.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from adamnx.schedule import coefficients

__all__ = ["COEFFICIENT_BLOCK", "MAX_TABLE_ROWS", "coordinate_table", "count_coefficients", "host_coefficients"]

# Host coefficients are evaluated a block of steps at a time, always over the same aligned block: a step sits at the
# same place of the same vectorised evaluation whether a tensor's scalar or a per-coordinate table asks for it, so
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
    """``(1 − β1_t, 1 − β̂2_t)`` as Python floats for step (or count) ``step``; cached, since a group shares its step."""
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
        self.limit = self._rows(*coefficients(torch.tensor([2.0**53], dtype=torch.float64), self.betas))
        self.complete = False

    def _rows(self, w1: Tensor, w2: Tensor) -> Tensor:
        return torch.stack([w1, 1 - w2, w2]).to(self.dtype)  # β̂2 formed in float64, then rounded (as elsewhere)

    def extend_to(self, length: int) -> None:
        blocks, have = [], self.rows.shape[1]
        while not self.complete and have < length:
            block = self._rows(*_coefficient_block(have // COEFFICIENT_BLOCK, *self.betas))
            blocks.append(block)
            have += COEFFICIENT_BLOCK
            self.complete = bool((block[:, -1] == self.limit[:, 0]).all())
        if blocks:
            self.rows = torch.cat([self.rows, torch.cat(blocks, dim=1).to(self.device)], dim=1)


_TABLES: OrderedDict[tuple, _Table] = OrderedDict()
_MAX_TABLES = 8  # betas that change every step (a β2 schedule) must not pile tables up

# The longest table kept (48 MB in float32). Past it a table is sized by the longest count (one reduction over the
# lags), and counts longer still get their coefficients evaluated per element instead: for β2 ≥ 0.999 the rounded
# coefficients keep changing for 10⁸ steps and more, and a table that long would not fit in memory.
MAX_TABLE_ROWS = 1 << 22
# A table built from scratch at a step past this is sized by the counts, not the step (betas that change every step
# would otherwise rebuild a table as long as the run at every step).
_FRESH_BY_STEP = 1 << 16


def coordinate_table(
    max_step: float,
    longest_count: Callable[[], int],
    beta1: float,
    beta2: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The per-coordinate coefficients for counts of at most ``max_step``: a (3, L) tensor of rows (1 − β1_t, β̂2_t,
    1 − β̂2_t) in ``dtype`` on ``device``, row t for count t (row 0, a coordinate that has not started: t = 1's
    values); None when the counts are too long for a table (see MAX_TABLE_ROWS): the caller then evaluates
    :func:`coefficients` per element (:func:`count_coefficients` with the betas). ``longest_count()`` gives the
    longest count, asked for only when ``max_step`` alone would make the table too long.

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
            longest = min(longest, 1 + longest_count())
        if longest >= length:
            table.extend_to(min(max(longest + 1, 2 * length), MAX_TABLE_ROWS))
        if longest >= table.rows.shape[1] and not table.complete:
            return None  # longer than the longest table, and the coefficients still change there
    return table.rows


def count_coefficients(
    source: Tensor | tuple[float, float], count: Tensor, dtype: torch.dtype, clamp: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(1 − β1_t, β̂2_t, 1 − β̂2_t) of each coordinate, shaped like ``count`` (≥ 0), in ``dtype``: gathered from a
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
