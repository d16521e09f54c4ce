"""DTensors (FSDP2's sharded params) where the update works on each rank's local part: recognising one, taking its
local part, and placing a local result like another DTensor. torch.distributed.tensor is imported only when one is
met (importing it costs ~0.3 s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["is_dtensor", "local_part", "placed_like"]


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor, without importing torch.distributed.tensor."""
    return type(t).__name__ == "DTensor"


def local_part(t: Any) -> Any:
    """This rank's part of a DTensor (a view of its storage: writes reach the DTensor); anything else itself."""
    return t.to_local() if is_dtensor(t) else t


def placed_like(local: Tensor, like: DTensor) -> Tensor:
    """``local`` (this rank's part, shaped like ``like``'s) as a DTensor on ``like``'s mesh with its placements."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
