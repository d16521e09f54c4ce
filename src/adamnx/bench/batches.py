"""The data order of every run, in both frameworks: batch indices from (seed, epoch), augmentation from (seed, step).

A resumed run recomputes exactly the batches it would have seen, so it replays the uninterrupted run.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BatchOrder", "augment_generator"]


class BatchOrder:
    """Epoch-wise shuffled batches of ``batch_size`` out of ``n`` examples; the last partial batch is dropped."""

    def __init__(self, seed: int, n: int, batch_size: int) -> None:
        self.seed, self.n, self.batch_size = seed, n, batch_size
        self.steps_per_epoch = max(1, n // batch_size)  # drop_last, as the authors do
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> Tensor:
        """The example indices of training step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def augment_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of step ``step``'s augmentation."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
