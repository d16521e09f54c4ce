"""Helpers for the places torch.optim goes: parameter groups with and without weight decay.

Recipes (README, "Scaling out"):

- Hugging Face ``transformers.Trainer(..., optimizer_cls_and_kwargs=(AdamNX, {"lr": 1e-3}))``, or build the
  optimizer yourself and pass ``optimizers=(opt, scheduler)`` (use :func:`param_groups` for the usual split).
  With ``optimizer_cls_and_kwargs`` the Trainer's ``TrainingArguments.weight_decay`` (0.0 by default) is put on
  every group and overrides AdamNX's 0.01, and a ``weight_decay`` in the kwargs: set it in the arguments.
- PyTorch Lightning: return ``AdamNX(self.parameters(), ...)`` from ``configure_optimizers``; its closure-driven
  ``step(closure)`` evaluates the closure exactly once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float, extra_no_decay: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices and kernels (params with ≥ 2 dims: Linear/Conv/Embedding weights),
    none on biases, norm scales and other 1-D params — the usual rule, and the AdamNX authors' (they decay
    Conv2d/Linear weights only). Names containing any of ``extra_no_decay`` are also excluded from decay.

    >>> import torch
    >>> groups = param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)), 0.01)
    >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
    ([1, 3], [0.01, 0.0])
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and not any(key in name for key in extra_no_decay):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
