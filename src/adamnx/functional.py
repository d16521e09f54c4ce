"""Functional AdamNX: :func:`adamnx`, shaped like ``torch.optim.adamw.adamw`` (flat lists of tensors, updated in place).

A step is planned once (:func:`adamnx.plan.plan_step`: the coefficients' granularity, the math dtype, what it writes)
and applied by the executor the flags select from the table :data:`adamnx.backends.BACKENDS` (for-loop, foreach,
fused). Every executor takes its coefficients from :func:`adamnx.schedule.coefficients`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from adamnx import backends, guard
from adamnx._dtensor import shard_index
from adamnx.backends import Backend
from adamnx.plan import Hyperparameters, StepPlan, finish, plan_step
from adamnx.schedule import check_betas
from adamnx.update import stochastic_round_to_bf16

__all__ = ["adamnx", "step_tensors", "stochastic_round_to_bf16"]


def adamnx(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    *,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    stochastic_rounding: bool = False,
    coord_steps: list[Tensor] | None = None,
) -> None:
    """Apply one AdamNX step to every tensor in ``params``, in place.

    See :class:`adamnx.AdamNX` for the algorithm and the meaning of each argument. ``state_steps`` holds one
    0-d step tensor per parameter (incremented here); ``grad_scale``/``found_inf`` come from a
    ``torch.amp.GradScaler`` and are only accepted by the fused implementation. ``exp_avgs``/``exp_avg_sqs``
    may be wider than the params (float32 state for bf16 params): the update is then computed in the state's
    precision and rounded once (stochastically with ``stochastic_rounding`` for bf16 params).
    ``coord_steps`` (one int32 tensor shaped like each param's real view, or None) switches on per-coordinate
    step counts (``per_coordinate_steps``), in every implementation: each coordinate's count, advanced here. (The
    optimizer keeps when each coordinate started instead, written once: see :mod:`adamnx.guard`.)
    """
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` must be a list of 0-d step tensors, one per parameter")
    flags = backends.resolve_flags(fused, foreach, params, differentiable=differentiable, capturable=capturable, lr=lr)
    hp = Hyperparameters(beta1, beta2, lr, weight_decay, eps, maximize, stochastic_rounding)
    states = None
    if coord_steps is not None:
        states = [
            {"coord_lag": _element_lags(count, step)} for count, step in zip(coord_steps, state_steps, strict=True)
        ]
    step_tensors(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, hp, flags,
        grad_scale=grad_scale, found_inf=found_inf, capturable=capturable, differentiable=differentiable,
        has_complex=has_complex or any(p.is_complex() for p in params), guard_states=states,
    )  # fmt: skip
    if coord_steps is not None and states is not None:
        for count, state, step in zip(coord_steps, states, state_steps):
            count.copy_(_counts(state["coord_lag"], step, count))


def _element_lags(count: Tensor, step: Tensor) -> Tensor:
    """Lags per element of counts at the step before this one, computed where they live (no host read)."""
    relative, _ = guard.relative_step_on_device(step.to(count.device))
    return torch.where(count == 0, guard.NOT_STARTED, relative - count.to(torch.int64)).to(torch.int32)


def _counts(lag: Tensor, step: Tensor, like: Tensor) -> Tensor:
    return guard.counts_on_device(lag.to(like.device), step.to(like.device)).expand(like.shape).to(torch.int32)


def step_tensors(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    flags: dict[str, bool],
    *,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = True,
    guard_states: list[dict[str, Any]] | None = None,
    moment_scales: list[tuple[Tensor, Tensor] | None] | None = None,
    noise_key: tuple[int, ...] = (),
) -> None:
    """One step of these tensors with the rows the (resolved) ``flags`` select for their devices: plan, execute,
    finish. ``guard_states``: with per_coordinate_steps, each param's state, holding its ``coord_lag``.
    ``moment_scales``: per param, the block scales of its 8-bit moments (:mod:`adamnx.quantized`), or None.
    ``noise_key``: where these tensors are in the optimizer (its group's index...), mixed into the seed of stochastic
    rounding so that two steps of tensors alike draw other numbers."""
    if isinstance(hp.beta1, float) and isinstance(hp.beta2, float):
        check_betas(hp.beta1, hp.beta2)  # before any counter advances: a step that raises changes nothing
    by_device: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device.type, []).append(i)
    for device_type, indices in by_device.items():
        backend = backends.select(flags, device_type)
        if differentiable and not backend.differentiable:
            option = next(key for key, value in backend.options.items() if value)
            raise RuntimeError(f"`{option}` does not support `differentiable`")

        run = _run if backend.traced else _run_outside_graphs

        def part(lst: list[Any] | None, indices: list[int] = indices) -> Any:
            return lst if lst is None or len(by_device) == 1 else [lst[i] for i in indices]

        run(
            backend, part(params), part(grads), part(exp_avgs), part(exp_avg_sqs), part(state_steps), hp,
            grad_scale=grad_scale, found_inf=found_inf, capturable=capturable, differentiable=differentiable,
            has_complex=has_complex, guard_states=part(guard_states), moment_scales=part(moment_scales),
            noise_key=noise_key,
        )  # fmt: skip


def _run(
    backend: Backend,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hp: Hyperparameters,
    noise_key: tuple[int, ...] = (),
    **kwargs: Any,
) -> None:
    plan = plan_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, hp, backend, **kwargs)
    if plan is None:
        return
    with _rounding_noise(plan, noise_key):
        backend.execute(plan)
    finish(plan)


def _rounding_noise(plan: StepPlan, noise_key: tuple[int, ...] = ()) -> contextlib.AbstractContextManager[Any]:
    """Where the step rounds stochastically (8-bit codes, bf16 moments, ``stochastic_rounding``) with its counters on
    the host: torch's generators (the CPU's, and the CUDA devices' the step draws on) seeded from the step itself (each
    bucket's count, size and first tensor's shape, which shard of it this rank holds, and ``noise_key``: the tensors'
    place in the optimizer, or two param groups of the same shapes would round alike), and restored afterwards.
    Replicas of a param (DDP, HSDP) then draw the same numbers whatever each rank's generator holds (per-rank seeds
    for dropout made their codes drift apart), a restarted run draws what the uninterrupted one did, and stepping
    leaves the user's random stream where it was.
    On the device (capturable, torch.compile) the device's generator is used as it is."""
    rounds = any(b.stochastic or b.scales is not None or b.exp_avgs[0].dtype == torch.bfloat16 for b in plan.buckets)
    if plan.on_device or not rounds or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    key = [noise_key] + [
        (
            int(b.step_values[0]) if b.step_values else 0, len(b.params), tuple(b.params[0].shape),
            str(b.params[0].dtype), shard_index(b.params[0]),  # FSDP2: each shard draws its own numbers
        )
        for b in plan.buckets
    ]  # fmt: skip
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1
    cuda = sorted({b.device.index or 0 for b in plan.buckets if b.device.type == "cuda"})
    return _seeded(seed, cuda)


@contextlib.contextmanager
def _seeded(seed: int, cuda_devices: list[int]) -> Iterator[None]:
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


# An executor that is not traced (a C++ kernel) runs as it is under torch.compile(opt.step), outside the graph, with
# its planning: tracing into it would gain nothing.
_run_outside_graphs = torch.compiler.disable(_run)
