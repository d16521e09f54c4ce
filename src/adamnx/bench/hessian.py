"""The top Hessian eigenvalue by power iteration on Hessian-vector products (the "flat minima" probe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["top_hessian_eigenvalue"]


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor], params: Sequence[Tensor], iters: int = 20, seed: int = 0, tol: float = 1e-4
) -> float:
    """The eigenvalue of largest magnitude of ∇²loss at ``params`` (Rayleigh quotient of the power iterate).

    Uses double backprop: one gradient graph, then ``iters`` Hessian-vector products. Stops early when the
    estimate changes by less than ``tol`` (relative).
    """
    params = [p for p in params if p.requires_grad]
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    estimate = 0.0
    for _ in range(max(iters, 1)):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        new_estimate = sum((a * b).sum() for a, b in zip(hv, v)).item()
        norm = torch.sqrt(sum((x * x).sum() for x in hv))
        if norm == 0:
            return 0.0
        v = [x / norm for x in hv]
        if abs(new_estimate - estimate) <= tol * abs(new_estimate):
            return new_estimate
        estimate = new_estimate
    return estimate
