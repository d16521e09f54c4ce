"""``AdamNX8bit``: AdamNX with 8-bit moments (the name bitsandbytes and torchao give their ``AdamW8bit``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from adamnx import backends, quantized
from adamnx.optimizer import AdamNX

__all__ = ["AdamNX8bit"]


class AdamNX8bit(AdamNX):
    """:class:`adamnx.AdamNX` with m and v kept as 8-bit codes: about 2.03 bytes of state per param instead of 8.

    The same algorithm, constructor and API as :class:`adamnx.AdamNX` (param groups, the late-activation guard,
    GradScaler, ``torch.compile``, ``state_dict``, DDP, FSDP2 and distributed checkpoints); only the moments' storage
    differs (:mod:`adamnx.quantized`): blocks of 256 elements with one float32 scale each, a signed power-law code for
    m and an unsigned one for v, every code rounded stochastically so that the stored moments are unbiased (AdamNX's
    1 − β̂2_t ≈ 1/t would make v stall under round-to-nearest). The update is computed in float32 from the moments
    before they are quantized. FSDP2's shards each have their own blocks (a block never straddles two ranks).

    Params with fewer than ``min_8bit_size`` elements (biases, norms) and float64 or complex params keep ordinary
    moments in ``state_dtype`` (default: the param's dtype), as bitsandbytes and torchao do.

    The state holds the codes (``exp_avg_codes`` int8, ``exp_avg_sq_codes`` uint8) and their scales
    (``exp_avg_absmax``, ``exp_avg_sq_absmax``); they round-trip bitwise. An :class:`adamnx.AdamNX` checkpoint loads
    into ``AdamNX8bit`` (its moments quantized: each element within one code of its value, unbiased), and an
    ``AdamNX8bit`` checkpoint into :class:`adamnx.AdamNX` (dequantized exactly, in float32). ``fused=True`` on the CPU
    runs the C++ kernel (dequantize, update, requantize in one pass); ``fused=True`` on an accelerator compiles
    :func:`adamnx.quantized.update_8bit` with TorchInductor; ``foreach`` and the for-loop run it in torch ops.
    ``differentiable=True`` is not supported (codes have no gradient).

    The arguments are :class:`adamnx.AdamNX`'s, and:

    Args:
        min_8bit_size: params with fewer elements keep ordinary moments (default 4,096).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        min_8bit_size: int = quantized.MIN_SIZE,
        **options: Any,
    ) -> None:
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be a positive int, got {min_8bit_size!r}")
        # (the options each group may not have, differentiable=True among them, are refused in add_param_group)
        self.min_8bit_size = min_8bit_size
        super().__init__(params, lr, betas, eps, weight_decay, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        if merged.get("differentiable"):
            raise ValueError("AdamNX8bit does not support differentiable=True: its 8-bit codes have no gradient")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and self._keeps_8bit(p):
                quantized.shard_layout(p)  # a DTensor sharded otherwise than FSDP2's rows is refused here
        param_group = {**param_group, "params": params}
        rows = backends.rows_for(merged.get("fused"), merged.get("foreach"))
        unsupported = [row.name for row in rows if not row.quantized_state]
        if unsupported:
            raise ValueError(f"AdamNX8bit: the implementation {unsupported[0]!r} does not step 8-bit moments")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:  # torch.optim's keeps defaults, state and groups only
        return {**super().__getstate__(), "min_8bit_size": self.min_8bit_size}

    def _keeps_8bit(self, p: Tensor) -> bool:
        real_float = p.is_floating_point() and p.dtype != torch.float64
        return real_float and p.numel() >= getattr(self, "min_8bit_size", quantized.MIN_SIZE)
