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

Sharded params (FSDP2's DTensors, sharded along dim 0 and replicated otherwise): each rank's local shard has its own
blocks, counted from the shard's first element, so that a block never straddles two ranks. The codes are DTensors
placed like the param; the scales are a DTensor of shape (shards, blocks of the largest shard), one row per shard
(the rows of shorter shards end in unused zeros), placed like the param too. Distributed checkpoints then save and load
every rank's blocks as they are, and a checkpoint of one sharding cannot be read into another (its scales' shape
differs; DCP refuses it).

Executors call :func:`update_8bit` (torch ops: the for-loop, foreach, capturable, ``torch.compile`` and accelerator
paths) or the C++ kernel's ``fused_step_8bit_`` (fused, CPU), which follows the same rules, on plain tensors (a
DTensor's local parts: :func:`local_tensors`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from adamnx._dtensor import check_placed_like, is_dtensor, local_part, placed_like
from adamnx.update import Weights, update

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "BLOCK",
    "CODE_KEYS",
    "MIN_SIZE",
    "QUANTIZED_KEYS",
    "blocks_of",
    "check_quantized_state",
    "dequantize",
    "is_quantized_state",
    "local_tensors",
    "moments_of",
    "new_state",
    "quantize",
    "quantized_moments",
    "scales_shape",
    "shard_layout",
    "state_bytes_per_param",
    "update_8bit",
    "upgraded_state_dict",
]

BLOCK = 256
"""Elements per quantization block (one float32 scale each). A multiple of it never straddles an FSDP shard."""
MIN_SIZE = 4096
"""Params with fewer elements keep float32 moments (biases, norms: their state is a rounding error of the total)."""
QUANTIZED_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")
"""The state entries that mark a param's moments as 8-bit codes (their blocks' scales). The format has no version
entry: this is its first. A future format must add one (a new key), which this version's loader refuses as unknown:
an old version then refuses a new checkpoint loudly instead of reading its codes with the wrong map."""

CODE_KEYS = ("exp_avg_codes", "exp_avg_sq_codes")
"""The state entries holding m's int8 codes and v's uint8 codes (in the optimizer's state and in its state dicts).
Not ``exp_avg``/``exp_avg_sq``: loaders that fill a state dict by key and cast what they find
(torch.distributed.checkpoint) would otherwise load int8 codes into a float32 AdamNX's moments as numbers, silently;
with their own names a checkpoint of the other optimizer misses keys, which they refuse. State dicts of the first
8-bit version (codes under ``exp_avg``/``exp_avg_sq``) still load: :func:`upgraded_state_dict`."""
_FIRST_VERSION_KEYS = {"exp_avg": "exp_avg_codes", "exp_avg_sq": "exp_avg_sq_codes"}

_SIGNED_LEVELS, _UNSIGNED_LEVELS = 127, 255
_UNSHARDED_8BIT = (
    "8-bit state saved without sharding has other blocks. Load it into AdamNX8bit before sharding, or save through "
    "torch.distributed.checkpoint"
)
_CODE_DTYPES = {"exp_avg_codes": torch.int8, "exp_avg_sq_codes": torch.uint8}


def blocks_of(numel: int) -> int:
    """The number of blocks (scales) of a tensor of ``numel`` elements."""
    return -(-numel // BLOCK)


def shard_layout(param: Tensor) -> tuple[int, int] | None:
    """The shape of the scales of a DTensor param, (shards, blocks of the largest shard); None for a plain tensor.

    The shards are those of dim 0 (FSDP2's, as torch.chunk cuts them: ⌈rows/shards⌉ rows each, the last ones shorter
    or empty); other mesh dimensions must replicate the param. Raises ValueError for other placements (a shard of
    another dim, strided or partial placements): their local parts are not runs of whole rows."""
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Shard

    placements = param.placements
    sharded = [i for i, placement in enumerate(placements) if not placement.is_replicate()]
    if len(sharded) > 1 or any(placements[i] != Shard(0) or type(placements[i]) is not Shard for i in sharded):
        raise ValueError(
            f"AdamNX8bit steps DTensor params sharded along dim 0 and replicated otherwise (FSDP2, HSDP), not "
            f"{tuple(placements)}: its quantization blocks follow each rank's rows. Use AdamNX for these params "
            "(state_dtype=torch.bfloat16 halves their state)"
        )
    shards = param.device_mesh.size(sharded[0]) if sharded else 1
    rows = param.shape[0] if param.dim() else 1
    rows_per_shard = -(-rows // shards)
    return shards, blocks_of(rows_per_shard * (param.numel() // rows if rows else 0))


def scales_shape(param: Tensor) -> tuple[int, ...]:
    """The shape of each moment's scales for ``param``: one per block, or one row per shard (:func:`shard_layout`)."""
    layout = shard_layout(param)
    return (blocks_of(param.numel()),) if layout is None else layout


def _local_scales(scales: Tensor, local_numel: int) -> Tensor:
    """The scales of this rank's blocks: its row of a sharded param's scales, as many as its shard has blocks (a
    contiguous view: writes go to the DTensor)."""
    return scales.to_local().reshape(-1)[: blocks_of(local_numel)] if is_dtensor(scales) else scales


def local_tensors(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_absmax: Tensor, exp_avg_sq_absmax: Tensor
) -> list[Tensor]:
    """A param with 8-bit moments as the plain tensors an executor updates: themselves, or for a DTensor param this
    rank's shard, its gradient, its codes and the scales of its blocks (views: the update writes into the DTensors)."""
    if not is_dtensor(param):
        return [param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax]
    local = param.to_local()
    n = local.numel()
    return [
        local, local_part(grad), local_part(exp_avg), local_part(exp_avg_sq),
        _local_scales(exp_avg_absmax, n), _local_scales(exp_avg_sq_absmax, n),
    ]  # fmt: skip


def _sharded_scales(local: Tensor, param: DTensor) -> Tensor:
    """This rank's block scales as its row of a sharded param's scales (:func:`shard_layout`)."""
    from torch.distributed.tensor import DTensor

    layout = shard_layout(param)
    assert layout is not None
    row = local.new_zeros(1, layout[1])
    row[0, : local.numel()] = local
    return DTensor.from_local(
        row, param.device_mesh, param.placements, run_check=False, shape=torch.Size(layout), stride=(layout[1], 1)
    )


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


def upgraded_state_dict(state_dict: Any) -> Any:
    """A state dict with the codes of the first 8-bit version (under ``exp_avg``/``exp_avg_sq``, beside the scales)
    renamed to :data:`CODE_KEYS`: a new dict where any were, else ``state_dict`` itself (malformed ones too: the
    checks that follow name what is wrong). Refuses (ValueError) a param state holding codes under both names."""
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(state, dict):
        return state_dict
    renamed = {}
    for pid, p_state in state.items():
        if not is_quantized_state(p_state) or not any(key in p_state for key in _FIRST_VERSION_KEYS):
            continue
        if any(key in p_state for key in CODE_KEYS):
            both = [key for key in (*_FIRST_VERSION_KEYS, *CODE_KEYS) if key in p_state]
            raise ValueError(
                f"state of parameter {pid} holds 8-bit scales with both {both}: which are its codes is ambiguous"
            )
        renamed[pid] = {_FIRST_VERSION_KEYS.get(key, key): value for key, value in p_state.items()}
    return {**state_dict, "state": {**state, **renamed}} if renamed else state_dict


def new_state(param: Tensor) -> dict[str, Tensor]:
    """Zero 8-bit moments for ``param`` (codes 0 are the value 0); DTensors placed like it for a DTensor param."""
    if is_dtensor(param):
        local = local_part(param)
        codes = {key: placed_like(torch.zeros(local.shape, dtype=dtype, device=local.device), param)
                 for key, dtype in _CODE_DTYPES.items()}  # fmt: skip
        zeros = torch.zeros(blocks_of(local.numel()), dtype=torch.float32, device=local.device)
        return {**codes, **{key: _sharded_scales(zeros, param) for key in QUANTIZED_KEYS}}
    n = blocks_of(param.numel())
    return {
        "exp_avg_codes": torch.zeros(param.shape, dtype=torch.int8, device=param.device),
        "exp_avg_sq_codes": torch.zeros(param.shape, dtype=torch.uint8, device=param.device),
        "exp_avg_absmax": torch.zeros(n, dtype=torch.float32, device=param.device),
        "exp_avg_sq_absmax": torch.zeros(n, dtype=torch.float32, device=param.device),
    }


def check_quantized_state(p_state: Any, param: Tensor, where: str) -> None:
    """Refuse (ValueError naming the field) 8-bit moments that do not fit ``param``: codes of another shape or dtype,
    the code −128 (no value), scales of another shape or dtype, negative or non-finite scales; for a DTensor param,
    codes and scales that are not DTensors placed like it (and plain ones for a plain param)."""
    missing = [key for key in (*CODE_KEYS, *QUANTIZED_KEYS) if key not in p_state]
    if missing:
        raise ValueError(f"{where} holds 8-bit moments but is missing {missing}")
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(f"{where} holds 8-bit moments, which only real floating-point params have")
    try:
        expected = scales_shape(param)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for key in (*_CODE_DTYPES, *QUANTIZED_KEYS):
        check_placed_like(p_state[key], param, f"{where}: 8-bit '{key}'", _UNSHARDED_8BIT)
    for key, dtype in _CODE_DTYPES.items():
        codes = p_state[key]
        if not isinstance(codes, Tensor) or codes.dtype != dtype or codes.shape != param.shape:
            got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"{where}: 8-bit '{key}' must be {dtype} codes shaped {tuple(param.shape)}, got {got}")
        if codes.layout != torch.strided or codes.device.type == "meta":
            raise ValueError(f"{where}: 8-bit '{key}' must be a dense tensor with values")
        if dtype == torch.int8 and bool((local_part(codes) == -128).any()):
            raise ValueError(f"{where}: 8-bit '{key}' holds the code -128, which no value has (codes are -127..127)")
    for key in QUANTIZED_KEYS:
        scales = p_state[key]
        if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != expected:
            got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, Tensor) else type(scales).__name__
            per = f"one scale per {BLOCK} elements" if len(expected) == 1 else f"one row of {BLOCK}-element blocks' "
            per += "" if len(expected) == 1 else "scales per shard"
            raise ValueError(f"{where}: '{key}' must be float32 of shape {expected}, {per}, got {got}")
        if scales.layout != torch.strided or scales.device.type == "meta":
            raise ValueError(f"{where}: '{key}' must be a dense tensor with values")
        local = local_part(scales)
        if not bool(torch.isfinite(local).all()) or bool((local < 0).any()):
            raise ValueError(f"{where}: '{key}' holds negative, inf or NaN scales")


def moments_of(p_state: Any, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A param's moments as values (dequantized when they are 8-bit) in ``dtype`` (DTensors for sharded state)."""
    if not is_quantized_state(p_state):
        return p_state["exp_avg"].to(dtype), p_state["exp_avg_sq"].to(dtype)
    moments = []
    for key, scale_key in zip(_CODE_DTYPES, QUANTIZED_KEYS):
        codes = p_state[key]
        local = local_part(codes)
        value = dequantize(local, _local_scales(p_state[scale_key], local.numel()), dtype)
        moments.append(placed_like(value, codes) if is_dtensor(codes) else value)
    return moments[0], moments[1]


def moment_chunks(p_state: Any, elements: int) -> Iterator[tuple[Tensor, Tensor]]:
    """A param's 8-bit moments as float32 values (this rank's part, flat), about ``elements`` at a time (whole blocks):
    every value, without a full-size copy of a moment."""
    m_codes, v_codes = (local_part(p_state[key]).reshape(-1) for key in CODE_KEYS)
    n = m_codes.numel()
    m_scales, v_scales = (_local_scales(p_state[key], n) for key in QUANTIZED_KEYS)
    size = max(BLOCK, elements - elements % BLOCK)
    for start in range(0, n, size):
        first, blocks = start // BLOCK, blocks_of(min(size, n - start))
        yield (
            dequantize(m_codes[start : start + size], m_scales[first : first + blocks]),
            dequantize(v_codes[start : start + size], v_scales[first : first + blocks]),
        )


def quantized_moments(exp_avg: Tensor, exp_avg_sq: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Moments given as values, quantized (a conversion: rounded stochastically with a generator seeded by ``seed``,
    so a conversion is reproducible). DTensor moments (a sharded param's) are quantized shard by shard."""
    m, v = local_part(exp_avg), local_part(exp_avg_sq)
    generator = torch.Generator(device=m.device).manual_seed(seed)
    bits = torch.randint(-(1 << 31), 1 << 31, m.shape, dtype=torch.int32, device=m.device, generator=generator)
    m_codes, m_scales = quantize(m, signed=True, noise=bits & 0xFFFF)
    v_codes, v_scales = quantize(v, signed=False, noise=(bits >> 16) & 0xFFFF)
    if is_dtensor(exp_avg):
        m_codes, v_codes = placed_like(m_codes, exp_avg), placed_like(v_codes, exp_avg)
        m_scales, v_scales = _sharded_scales(m_scales, exp_avg), _sharded_scales(v_scales, exp_avg)
    return {
        "exp_avg_codes": m_codes,
        "exp_avg_sq_codes": v_codes,
        "exp_avg_absmax": m_scales,
        "exp_avg_sq_absmax": v_scales,
    }


def state_bytes_per_param(numel: int) -> float:
    """Bytes of 8-bit state per element of a quantized param (codes and scales of both moments)."""
    return 2 + 2 * 4 * blocks_of(numel) / numel if numel else math.nan
