"""DTensors (FSDP2's sharded params) where the update works on each rank's local part: recognising one, taking its
local part, placing a local result like another DTensor, refusing state placed otherwise than its param, and the
decisions every rank must take alike (one all-reduce of a flag over the mesh; which shard a rank holds).
torch.distributed.tensor is imported only when one is met (importing it costs ~0.3 s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["any_across", "any_nonzero", "check_placed_like", "is_dtensor", "local_part", "placed_like", "shard_index"]


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor, without importing torch.distributed.tensor."""
    return type(t).__name__ == "DTensor"


def local_part(t: Any) -> Any:
    """This rank's part of a DTensor (a view of its storage: writes reach the DTensor); anything else itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_index(t: Any) -> tuple[int, ...]:
    """Which shard of a DTensor this rank holds: its coordinates along the mesh dimensions that shard it (not those
    that replicate it, whose ranks hold the same values); () for anything else."""
    if not is_dtensor(t):
        return ()
    coordinate = tuple(t.device_mesh.get_coordinate() or ())
    return tuple(c for c, placement in zip(coordinate, t.placements) if placement.is_shard())


def any_nonzero(t: Tensor) -> bool:
    """Whether any element of ``t`` is not 0 (NaN is); of the whole tensor for a DTensor, so that every rank gets the
    same answer (one all-reduce of a flag over its mesh)."""
    found = local_part(t).any()
    return any_across(found, t) if is_dtensor(t) else bool(found)


def any_across(flag: Tensor, like: DTensor) -> bool:
    """Whether ``flag`` (0-d, this rank's) is set on any rank of ``like``'s mesh: one all-reduce, the same answer on
    every rank (a decision that each rank took from its own shard alone would split the ranks)."""
    import torch
    from torch.distributed.tensor import DTensor, Partial

    mesh = like.device_mesh
    summed = DTensor.from_local(flag.reshape(()).to(torch.int32), mesh, [Partial()] * mesh.ndim, run_check=False)
    return bool(summed.full_tensor())


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
