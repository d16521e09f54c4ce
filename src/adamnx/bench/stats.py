"""The one mean and standard deviation of the bench (runs and reports)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_std"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the finite values; NaN where there are too few."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")
