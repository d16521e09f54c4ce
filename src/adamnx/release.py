"""Gradient release: each param stepped in the backward pass, as soon as its gradient is accumulated, and its
gradient freed at once, so that a training step never holds every gradient (torchtune's optimizer-in-backward).

The optimizer stays an ordinary :class:`adamnx.AdamNX`: its param groups (which LR schedulers drive), its state and
its checkpoints are unchanged, so a run moves between gradient release and a plain loop in either direction. Only
its ``step()`` and ``zero_grad()`` change while gradients are released: the backward pass has stepped every param
already, so ``step()`` runs the closure (if any) and steps nothing more, and ``zero_grad()`` keeps the gradients
being accumulated. Gradients present when the release starts are dropped (as a plain loop's next ``zero_grad()``
would): they belong to a step already taken.

What needs every gradient at once cannot follow: global gradient clipping, GradScaler (refused at its
``step``), ``skip_nonfinite`` and data parallelism that averages gradients after the backward pass (DDP, FSDP,
ZeRO: refused when ``torch.distributed`` runs several processes). Gradient accumulation is supported: with
``accumulation_steps=k`` each param is stepped at every k-th backward pass, its gradient kept (and summed by
autograd) in between.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from adamnx.optimizer import AdamNX

__all__ = ["GradientRelease", "release_gradients"]


def release_gradients(optimizer: AdamNX, *, accumulation_steps: int = 1) -> GradientRelease:
    """Step each param of ``optimizer`` in the backward pass, as soon as its gradient is ready, and free that
    gradient: training then needs no memory for all gradients at once (4 bytes per float32 param fewer).

    Args:
        optimizer: an :class:`adamnx.AdamNX` (any implementation, options and param groups).
        accumulation_steps: backward passes whose gradients are summed before each param's step (1: step at every
            backward pass). Scale the loss by ``1 / accumulation_steps`` for a mean, as with any accumulation.

    Returns:
        A :class:`GradientRelease`: ``.remove()`` (or leaving its ``with`` block) restores the ordinary optimizer.

    Raises:
        RuntimeError: ``torch.distributed`` runs several processes (DDP and FSDP average gradients after the backward
            pass: a param would be stepped with its local gradient), a group has ``differentiable=True`` or
            ``skip_nonfinite=True``, or the optimizer's gradients are released already.

    Example:
        >>> import torch, adamnx
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = adamnx.AdamNX(model.parameters(), lr=1e-2)
        >>> with adamnx.release_gradients(opt):
        ...     model(torch.randn(8, 4)).pow(2).mean().backward()  # steps every param, frees its gradient
        >>> state = opt.state[model.weight]
        >>> model.weight.grad is None, int(state["step"])
        (True, 1)
    """
    return GradientRelease(optimizer, accumulation_steps=accumulation_steps)


class GradientRelease:
    """The hooks that step an :class:`adamnx.AdamNX`'s params in the backward pass (see :func:`release_gradients`).

    ``step_calls``: how many times ``optimizer.step()`` was called while released (each call a no-op);
    ``backward_passes``: how many backward passes reached the optimizer's params.

    A backward pass is an autograd graph task: its first hook schedules the end of the pass. With
    ``accumulation_steps=k`` the k-th pass steps each param whose gradient it brings, in the pass; the end of that
    pass steps the params whose gradients came only from earlier passes of the cycle (an expert a micro-batch did not
    use), and params that get gradients without a hook (unfrozen since the release started): each param with a
    gradient is stepped once per cycle, as ``opt.step()`` after k backward passes would.
    """

    def __init__(self, optimizer: AdamNX, *, accumulation_steps: int = 1) -> None:
        if not isinstance(optimizer, AdamNX):
            raise TypeError(f"release_gradients takes an adamnx.AdamNX, got {type(optimizer).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an integer ≥ 1, got {accumulation_steps!r}")
        if optimizer._gradient_release is not None:
            raise RuntimeError("this optimizer's gradients are released already: .remove() the first release")
        _refuse_distributed()
        for index, group in enumerate(optimizer.param_groups):
            check_group(group, index)
        for group in optimizer.param_groups:
            for p in group["params"]:
                other = getattr(p, "_adamnx_gradient_release", None)
                if other is not None and other() is not None:
                    raise RuntimeError(
                        "a param of this optimizer is released by another optimizer already: each param can be "
                        "stepped in the backward pass by one optimizer only"
                    )
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.step_calls = 0
        self.backward_passes = 0
        self._current_pass: int | None = None  # the autograd graph task of the pass under way
        self._stepped_since_step_call: set[int] = set()  # id(param) of the params stepped since the last step()
        # id(param) → its group's index and its place in the group (groups are replaced on load, not reordered)
        self._place_of: dict[int, tuple[int, int]] = {}
        self._params: list[Tensor] = []
        self._hooked: set[int] = set()  # id(param) of the params that have a hook
        self._handles: list[RemovableHandle] = []
        optimizer._gradient_release = self
        for index in range(len(optimizer.param_groups)):
            self.watch(index)
        # Gradients left from before (a plain loop's last backward pass, already stepped) would be summed into the
        # next backward pass's: dropped, as the plain loop's next zero_grad() would.
        for p in self._params:
            p.grad = None

    def check_new_group(self, group: dict[str, Any], index: int) -> None:
        """``add_param_group`` while released: refuse a group with options the release does not support."""
        check_group(group, index)

    def watch(self, index: int) -> None:
        """Install the hook on every param of group ``index`` (called for each new group, too)."""
        me = weakref.ref(self)
        for position, p in enumerate(self.optimizer.param_groups[index]["params"]):
            if id(p) in self._place_of:
                continue
            self._place_of[id(p)] = (index, position)
            self._params.append(p)
            p._adamnx_gradient_release = me  # type: ignore[attr-defined]
            self._hook(p)

    def _hook(self, p: Tensor) -> None:
        if p.requires_grad and id(p) not in self._hooked:  # a frozen param cannot have one (its pass ends: later)
            self._handles.append(p.register_post_accumulate_grad_hook(self._gradient_ready))
            self._hooked.add(id(p))

    def _last_pass_of_cycle(self) -> bool:
        return (self.backward_passes + 1) % self.accumulation_steps == 0

    def _between_cycles(self) -> bool:
        """No cycle of accumulation is under way: gradients held now are not a cycle's partial sums."""
        return self.backward_passes % self.accumulation_steps == 0

    def _pass_started(self) -> None:
        """The first gradient of a backward pass: checks that need the whole optimizer, once per pass."""
        _refuse_distributed()  # initialised after the release started
        for index, group in enumerate(self.optimizer.param_groups):
            check_group(group, index)  # an option switched on in a group since the release started
        torch.autograd.Variable._execution_engine.queue_callback(self._pass_ended)

    def _gradient_ready(self, p: Tensor) -> None:
        try:
            task = torch._C._current_graph_task_id()
            if task != self._current_pass:
                if _inside_reentrant_checkpoint():
                    raise RuntimeError(
                        "gradient release does not support reentrant activation checkpointing "
                        "(torch.utils.checkpoint with use_reentrant=True): each checkpointed segment runs a backward "
                        "pass of its own, so a param would be stepped with part of its gradient. Use "
                        "use_reentrant=False (Hugging Face: gradient_checkpointing_kwargs={'use_reentrant': False})."
                    )
                self._pass_started()  # before anything of this pass is stepped: a refusal changes nothing
                self._current_pass = task
            if self._last_pass_of_cycle():
                self._step(p)
            # else: accumulating, autograd sums the next pass's gradient into this one
        except BaseException:
            self._current_pass = None  # the backward pass stops here: its end will not come
            raise

    def _pass_ended(self) -> None:
        self._current_pass = None
        last = self._last_pass_of_cycle()
        self.backward_passes += 1
        for p in self._params:
            if not p.requires_grad:
                continue
            self._hook(p)  # unfrozen since
            if last and p.grad is not None:  # a gradient from an earlier pass of the cycle only, or without a hook
                self._step(p)

    def _step(self, p: Tensor) -> None:
        """Step ``p`` with its gradient and free the gradient (also when the step refuses it: a bad hyperparameter
        raises before ``p`` changes, and the next pass starts from no gradient)."""
        if self.step_calls and id(p) in self._stepped_since_step_call:
            raise RuntimeError(
                "a param whose gradients are released would be stepped a second time since the last "
                f"optimizer.step() (accumulation_steps={self.accumulation_steps}): several backward passes per step "
                "accumulate gradients, so pass accumulation_steps to release_gradients; or a param reached twice in "
                "one backward pass (reentrant activation checkpointing of a layer used in several segments: use "
                "use_reentrant=False)."
            )
        try:
            with torch.no_grad():
                self.optimizer._step_param(p, *self._place_of[id(p)])
        finally:
            p.grad = None
        self._stepped_since_step_call.add(id(p))
        self.optimizer._opt_called = True  # type: ignore[attr-defined]  # LR schedulers: the optimizer has stepped

    def _between_passes(self) -> None:
        """Called outside any backward pass: a pass whose end never came (it raised) is over."""
        if torch._C._current_graph_task_id() == -1:
            self._current_pass = None

    def step_called(self, closure: Callable[[], Any] | None) -> Any:
        """``optimizer.step()`` while released: runs the closure (whose backward pass steps the params); refuses a
        GradScaler, which needs every gradient at once to unscale and check them before any step."""
        self._between_passes()
        scaled = any(getattr(self.optimizer, name, None) is not None for name in ("grad_scale", "found_inf"))
        if scaled:
            for name in ("grad_scale", "found_inf"):  # GradScaler removes them only after a step that returns
                self.optimizer.__dict__.pop(name, None)
            raise RuntimeError(
                "GradScaler cannot drive an optimizer whose gradients are released: it unscales and checks every "
                "gradient before any step, and these were stepped in the backward pass, with the scaled gradients "
                "(the params are already changed). Use bf16 autocast, which needs no scaler, or step after "
                "backward() as usual."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif self._between_cycles():  # never inside a cycle: its gradients are partial
            self.optimizer._create_state_as_asked()
        self.step_calls += 1
        self._stepped_since_step_call.clear()
        return loss

    def zero_grad(self) -> None:
        """``optimizer.zero_grad()`` while released: drops the gradients, unless a cycle of accumulation is under way
        (after a backward pass that ends a cycle there are none: each was freed after its step)."""
        self._between_passes()
        if self._between_cycles():
            for p in self._params:
                p.grad = None

    def remove(self) -> None:
        """Remove the hooks: the optimizer steps after ``backward()`` again. Gradients being accumulated stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        for p in self._params:
            mark = getattr(p, "_adamnx_gradient_release", None)
            if mark is not None and mark() is self:
                delattr(p, "_adamnx_gradient_release")
        if self.optimizer._gradient_release is self:
            self.optimizer._gradient_release = None

    def __enter__(self) -> GradientRelease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def check_group(group: dict[str, Any], index: int) -> None:
    """Refuse a param group whose options need the step outside the backward pass."""
    for option, why in (
        ("differentiable", "autograd through the step needs the step outside the backward pass"),
        ("skip_nonfinite", "it skips a whole group when any of its gradients is not finite, which needs all of them "
         "at once"),
    ):  # fmt: skip
        if group.get(option):
            raise RuntimeError(f"param group {index}: gradient release does not support {option}=True: {why}")


def _reentrant_backward_code() -> Any:
    checkpoint_function = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
    return getattr(getattr(checkpoint_function, "backward", None), "__code__", None)


_REENTRANT_BACKWARD = _reentrant_backward_code()


def _inside_reentrant_checkpoint() -> bool:
    """Whether this hook runs in the backward pass that reentrant checkpointing starts for a segment (torch's
    ``CheckpointFunction.backward`` is on the Python stack): checked once per backward pass."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _REENTRANT_BACKWARD:
            return True
        frame = frame.f_back
    return False


def _refuse_distributed() -> None:
    if _processes() > 1:
        raise RuntimeError(
            "gradient release is not supported under torch.distributed with several processes: DDP, FSDP and ZeRO "
            "average (or reduce-scatter) the gradients after the backward pass, and a param stepped in the "
            "backward pass would use its local gradient. Step the optimizer after backward() as usual."
        )


def _processes() -> int:
    """How many processes torch.distributed runs (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
