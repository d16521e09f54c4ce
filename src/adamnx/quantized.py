"""The 8-bit state format of :class:`adamnx.AdamNX8bit`: m and v block-quantized, and their update in torch ops.

A moment of a param with n elements is kept as n one-byte codes and one float32 scale per block of :data:`BLOCK`
consecutive elements (the param's elements flattened in row-major order; the last block may be shorter): 2 + 8/256 ≈
2.03 bytes per param for both moments, against 8 for float32 state. Each block's scale is its largest magnitude, so
the largest element of a block is exact, and codes map to values by a power law that spends the codes where the
small values are:

* m (signed, int8 codes −127…127): ``m = scale · sign(q) · (|q|/127)⁴`` (down to 3.8e-9 of the block's largest);
* v (unsigned, uint8 codes 0…255): ``v = scale · (c/255)⁴`` (down to 2.4e-10 of the block's largest v, 1.5e-5 of
  its largest √v, which is what the update divides by).

Why every code rounds stochastically: AdamNX's weight 1 − β̂2_t ≈ 1/t makes a step's change of v smaller than the
gap between two codes after a few dozen steps, and rounding to the nearest code would stall v (or, as with bf16,
let it only rise). A value is rounded to one of its two neighbouring codes with the probabilities that make the
stored value unbiased: E[stored] = the value. Two exceptions keep the update bounded: a non-zero v never rounds to
the code 0 (below the smallest code it is stored as the smallest code: the update of a coordinate whose v is tiny
beside its block's largest is then smaller than float32's, never a division by ε), and m's codes reach further down
than √v's, so that a tiny m is not stored as a much larger one. A step computes the update in float32 from the
moments it has just computed, before they are quantized (the quantization error reaches the param only through
later steps).

A block of a moment with an inf or NaN gets a NaN scale: the whole block of that moment then reads as NaN, and the
next step writes NaN into the block's 256 params (float32 state confines an overflow of v, g² above 3.4e38, to its
element, whose update becomes 0). A block whose largest magnitude is below float32's smallest normal number (1.2e-38)
is stored as zeros.

Executors call :func:`update_8bit` (torch ops: the for-loop, foreach, capturable, ``torch.compile`` and accelerator
paths) or the C++ kernel's ``fused_step_8bit_`` (fused, CPU), which follows the same rules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adamnx.update import Weights, update

__all__ = [
    "BLOCK",
    "MIN_SIZE",
    "QUANTIZED_KEYS",
    "blocks_of",
    "check_quantized_state",
    "dequantize",
    "is_quantized_state",
    "moments_of",
    "new_state",
    "quantize",
    "quantized_moments",
    "state_bytes_per_param",
    "update_8bit",
]

BLOCK = 256
"""Elements per quantization block (one float32 scale each). A multiple of it never straddles an FSDP shard."""
MIN_SIZE = 4096
"""Params with fewer elements keep float32 moments (biases, norms: their state is a rounding error of the total)."""
QUANTIZED_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")
"""The state entries that mark a param's moments as 8-bit codes (their blocks' scales). The format has no version
entry: this is its first. A future format must add one (a new key), which this version's loader refuses as unknown:
an old version then refuses a new checkpoint loudly instead of reading its codes with the wrong map."""

_SIGNED_LEVELS, _UNSIGNED_LEVELS = 127, 255
_CODE_DTYPES = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}


def blocks_of(numel: int) -> int:
    """The number of blocks (scales) of a tensor of ``numel`` elements."""
    return -(-numel // BLOCK)


def _per_block(flat: Tensor, values: Tensor, op: Any) -> Tensor:
    """``op(element, its block's value)`` over a flat tensor: the whole blocks as (blocks, BLOCK) against a column of
    values, the last, shorter block apart. (No padding: TorchInductor miscompiles the indexing a padded last block
    needs on the CPU, torch 2.13.)"""
    n = flat.numel()
    whole = n - n % BLOCK
    blocks = whole // BLOCK
    head = op(flat[:whole].view(-1, BLOCK), values[:blocks].view(-1, 1)).reshape(-1)
    return torch.cat([head, op(flat[whole:], values[blocks:])])


def _block_max(magnitude: Tensor) -> Tensor:
    """Each block's largest element of a flat non-negative tensor (NaN where a block holds one)."""
    n = magnitude.numel()
    whole = n - n % BLOCK
    head = magnitude[:whole].view(-1, BLOCK).amax(1)
    tail = magnitude[whole:].amax(0, keepdim=True) if n > whole else magnitude.new_empty(0)
    return torch.cat([head, tail])


def _code_value(q: Tensor, signed: bool) -> Tensor:
    """The magnitude a code ``q`` ≥ 0 stands for, relative to its block's scale: (q/127)⁴ for m, (q/255)⁴ for v."""
    r = q * (1.0 / (_SIGNED_LEVELS if signed else _UNSIGNED_LEVELS))
    r = r * r
    return r * r


def dequantize(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The moment that int8 (m) or uint8 (v) ``codes`` and their blocks' ``scales`` hold, in ``dtype``, shaped like the
    codes."""
    flat = codes.reshape(-1).to(dtype)
    if codes.dtype == torch.int8:
        relative = _code_value(flat.abs(), signed=True)
        relative = torch.where(flat < 0, -relative, relative)
    else:
        relative = _code_value(flat, signed=False)
    return _per_block(relative, scales.to(dtype), torch.mul).view(codes.shape)


def quantize(x: Tensor, signed: bool, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` (float) as codes (int8 when ``signed``, else uint8, shaped like ``x``) and float32 block scales, each
    element rounded stochastically to one of its two neighbouring codes so that the stored value is unbiased (but a
    non-zero v below the smallest code, which is stored as the smallest code). ``noise``: int32 values uniform in
    [0, 2^16), shaped like ``x`` (drawn here when not given)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    magnitude = flat.abs()
    scales = _block_max(magnitude)
    # a block holding inf or NaN: a NaN scale (the block then reads as NaN), as the C++ kernel stores it
    scales = torch.where(torch.isfinite(scales), scales, torch.nan)
    # blocks of zeros, and blocks whose largest is subnormal (1/scale would overflow): codes 0
    inverse = torch.where(scales >= torch.finfo(torch.float32).tiny, 1.0 / scales, 0.0)
    r = _per_block(magnitude, inverse, torch.mul)  # in [0, 1] (a rounding above 1 is handled by the clamp below)
    levels = _SIGNED_LEVELS if signed else _UNSIGNED_LEVELS
    low = (r.sqrt().sqrt() * levels).floor_().clamp_(0, levels - 1)
    low_value, high_value = _code_value(low, signed), _code_value(low + 1, signed)
    if noise is None:
        noise = torch.randint(0, 1 << 16, flat.shape, dtype=torch.int32, device=flat.device)
    # up with probability (r − low)/(high − low), i.e. noise/2^16 below it: multiplied out, no division
    up = noise.reshape(-1).to(torch.float32) * (high_value - low_value) < (r - low_value) * 65536.0
    q = low.add_(up).nan_to_num_(0.0)
    if signed:
        codes = torch.where(flat < 0, -q, q).to(torch.int8)
    else:
        codes = torch.where((q == 0) & (r > 0), 1.0, q).to(torch.uint8)  # a non-zero v is never 0
    return codes.view(x.shape), scales


def update_8bit(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq_absmax: Tensor,
    weights: Weights,
    lr: Any,
    weight_decay: Any,
    eps: Any,
    *,
    dtype: torch.dtype = torch.float32,
    stochastic: bool = False,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamNX step of one param with 8-bit moments: dequantize, :func:`adamnx.update.update` in ``dtype`` on
    copies, the param rounded once (stochastically to bf16 with ``stochastic``), the moments quantized. ``weights``
    may be scalars, per row or per element (the guard). ``found_inf`` (a GradScaler's, on the device): a non-zero
    value leaves everything as it was."""
    from adamnx.update import stochastic_round_to_bf16

    # contiguous working copies whatever the param's layout (channels_last): the codes and blocks are row-major, and
    # an update written in place into a strided copy stops torch.compile's tracing (then inductor fails to lower)
    theta = param.to(dtype, memory_format=torch.contiguous_format, copy=True)
    m = dequantize(exp_avg, exp_avg_absmax, dtype)
    v = dequantize(exp_avg_sq, exp_avg_sq_absmax, dtype)
    g = grad.to(dtype, memory_format=torch.contiguous_format)
    theta, m, v = update(theta, g, m, v, weights, lr, weight_decay, eps, in_place=True)
    bits = torch.randint(-(1 << 31), 1 << 31, m.shape, dtype=torch.int32, device=m.device)
    m_codes, m_scales = quantize(m, signed=True, noise=bits & 0xFFFF)
    v_codes, v_scales = quantize(v, signed=False, noise=(bits >> 16) & 0xFFFF)
    new_param = stochastic_round_to_bf16(theta) if stochastic else theta.to(param.dtype)
    if found_inf is not None:
        skip = found_inf != 0
        new_param = torch.where(skip, param, new_param)
        m_codes, v_codes = torch.where(skip, exp_avg, m_codes), torch.where(skip, exp_avg_sq, v_codes)
        m_scales = torch.where(skip, exp_avg_absmax, m_scales)
        v_scales = torch.where(skip, exp_avg_sq_absmax, v_scales)
    param.copy_(new_param)
    exp_avg.copy_(m_codes)
    exp_avg_sq.copy_(v_codes)
    exp_avg_absmax.copy_(m_scales)
    exp_avg_sq_absmax.copy_(v_scales)


def is_quantized_state(p_state: Any) -> bool:
    """Whether a param's state (live or saved) holds 8-bit moments."""
    return hasattr(p_state, "get") and any(key in p_state for key in QUANTIZED_KEYS)


def new_state(param: Tensor) -> dict[str, Tensor]:
    """Zero 8-bit moments for ``param`` (codes 0 are the value 0)."""
    n = blocks_of(param.numel())
    return {
        "exp_avg": torch.zeros(param.shape, dtype=torch.int8, device=param.device),
        "exp_avg_sq": torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_absmax": torch.zeros(n, dtype=torch.float32, device=param.device),
        "exp_avg_sq_absmax": torch.zeros(n, dtype=torch.float32, device=param.device),
    }


def check_quantized_state(p_state: Any, param: Tensor, where: str) -> None:
    """Refuse (ValueError naming the field) 8-bit moments that do not fit ``param``: codes of another shape or dtype,
    the code −128 (no value), scales of another length or dtype, negative or non-finite scales."""
    missing = [key for key in ("exp_avg", "exp_avg_sq", *QUANTIZED_KEYS) if key not in p_state]
    if missing:
        raise ValueError(f"{where} holds 8-bit moments but is missing {missing}")
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(f"{where} holds 8-bit moments, which only real floating-point params have")
    for key, dtype in _CODE_DTYPES.items():
        codes = p_state[key]
        if not isinstance(codes, Tensor) or codes.dtype != dtype or codes.shape != param.shape:
            got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"{where}: 8-bit '{key}' must be {dtype} codes shaped {tuple(param.shape)}, got {got}")
        if codes.layout != torch.strided or codes.device.type == "meta":
            raise ValueError(f"{where}: 8-bit '{key}' must be a dense tensor with values")
        if dtype == torch.int8 and bool((codes == -128).any()):
            raise ValueError(f"{where}: 8-bit '{key}' holds the code -128, which no value has (codes are -127..127)")
    for key in QUANTIZED_KEYS:
        scales = p_state[key]
        expected = blocks_of(param.numel())
        if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (expected,):
            got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, Tensor) else type(scales).__name__
            raise ValueError(
                f"{where}: '{key}' must be float32 of shape ({expected},), one scale per {BLOCK} elements, got {got}"
            )
        if scales.layout != torch.strided or scales.device.type == "meta":
            raise ValueError(f"{where}: '{key}' must be a dense tensor with values")
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValueError(f"{where}: '{key}' holds negative, inf or NaN scales")


def moments_of(p_state: Any, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A param's moments as values (dequantized when they are 8-bit) in ``dtype``."""
    if is_quantized_state(p_state):
        return (
            dequantize(p_state["exp_avg"], p_state["exp_avg_absmax"], dtype),
            dequantize(p_state["exp_avg_sq"], p_state["exp_avg_sq_absmax"], dtype),
        )
    return p_state["exp_avg"].to(dtype), p_state["exp_avg_sq"].to(dtype)


def quantized_moments(exp_avg: Tensor, exp_avg_sq: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Moments given as values, quantized (a conversion: rounded stochastically with a generator seeded by ``seed``,
    so a conversion is reproducible)."""
    generator = torch.Generator(device=exp_avg.device).manual_seed(seed)
    bits = torch.randint(
        -(1 << 31), 1 << 31, exp_avg.shape, dtype=torch.int32, device=exp_avg.device, generator=generator
    )
    m_codes, m_scales = quantize(exp_avg, signed=True, noise=bits & 0xFFFF)
    v_codes, v_scales = quantize(exp_avg_sq, signed=False, noise=(bits >> 16) & 0xFFFF)
    return {"exp_avg": m_codes, "exp_avg_sq": v_codes, "exp_avg_absmax": m_scales, "exp_avg_sq_absmax": v_scales}


def state_bytes_per_param(numel: int) -> float:
    """Bytes of 8-bit state per element of a quantized param (codes and scales of both moments)."""
    return 2 + 2 * 4 * blocks_of(numel) / numel if numel else math.nan
