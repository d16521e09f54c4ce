"""Tensor helpers shared by the implementations (functional.py's for-loop and foreach, _fused.py's kernels).

Nothing here updates an optimizer: grouping tensors for multi-tensor kernels, the dtype an update is computed in,
the coefficients of a step read on the host, dense 1-D views, and stochastic rounding to bf16.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import Tensor

from adamnx.schedule import coefficients

__all__ = ["dense_1d_views", "group_by_device_and_dtype", "host_coefficients", "math_dtype", "stochastic_round_to_bf16"]


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


@functools.lru_cache(maxsize=4096)
def host_coefficients(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    """Python-float coefficients for a step read from a CPU counter; cached since a group shares its step."""
    return tuple(coefficients(step, (beta1, beta2)))


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
