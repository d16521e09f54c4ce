"""DTensors (FSDP2's sharded params) where the update works on each rank's local part: recognising one, taking its
local part, and placing a local result like another DTensor. torch.distributed.tensor is imported only when one is
met (importing it costs ~0.3 s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["any_nonzero", "check_placed_like", "is_dtensor", "local_part", "placed_like"]


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor, without importing torch.distributed.tensor."""
    return type(t).__name__ == "DTensor"


def local_part(t: Any) -> Any:
    """This rank's part of a DTensor (a view of its storage: writes reach the DTensor); anything else itself."""
    return t.to_local() if is_dtensor(t) else t


def any_nonzero(t: Tensor) -> bool:
    """Whether any element of ``t`` is not 0 (NaN is); of the whole tensor for a DTensor, so that every rank gets the
    same answer (one all-reduce of a flag over its mesh)."""
    found = t.any()
    return bool(found.full_tensor() if is_dtensor(found) else found)


def check_placed_like(value: Any, param: Tensor, where: str, plain_hint: str) -> None:
    """Refuse optimizer state placed otherwise than its param: a plain tensor for a DTensor (``plain_hint`` says what
    to do instead), a DTensor for a plain tensor, or another mesh or placements. A step would fail on it (mixed
    Tensor and DTensor) or, for 8-bit state, read another sharding's blocks."""
    if not isinstance(value, Tensor):
        return  # refused with the field's own message
    if is_dtensor(param) and not is_dtensor(value):
        raise ValueError(f"{where} is a plain tensor but the parameter is a DTensor (FSDP2): {plain_hint}")
    if is_dtensor(value) and not is_dtensor(param):
        raise ValueError(f"{where} is a DTensor but the parameter is a plain tensor: its parts are a sharding's")
    if not (is_dtensor(param) and is_dtensor(value)):
        return
    if value.device_mesh != param.device_mesh or tuple(value.placements) != tuple(param.placements):
        raise ValueError(
            f"{where} is placed {tuple(value.placements)} on {value.device_mesh}, the parameter "
            f"{tuple(param.placements)} on {param.device_mesh}"
        )


def placed_like(local: Tensor, like: DTensor) -> Tensor:
    """``local`` (this rank's part, shaped like ``like``'s) as a DTensor on ``like``'s mesh with its placements."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
