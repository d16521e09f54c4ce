"""What a step implementation (a backend) is: the values it is called with and the row that describes it.

Every implementation of the step is a function of one signature (:class:`StepFunction`), listed in one table,
``adamnx.functional.BACKENDS`` (implementation name → :class:`Backend`): :func:`adamnx.functional.adamnx` picks
the row from its ``fused``/``foreach`` flags and calls the row's step; the optimizer checks a group's params and
``state_dtype`` against the devices and dtypes of the rows its flags may run; and the tests run every row
(``tests/helpers.py::IMPLEMENTATIONS`` is derived from the table). ``fused=True`` has a second, per-device
table, ``adamnx._fused.FUSED_KERNELS`` (device type → the kernel that steps that device's tensors): its keys
are the devices ``fused=True`` accepts.

How to add a backend:

* **A fused kernel for another device** (MPS, a Triton kernel for XPU): write one module with a function that
  steps a group of tensors sharing a device and dtype, with the signature of ``_fused._compiled_step``
  (``params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, found_inf, hp, *, has_complex, stochastic,
  counts=None``), and add one row ``"mps": your_step`` to ``FUSED_KERNELS``. ``fused=True`` then accepts that
  device (the fused row's ``devices`` are the table's keys) and runs your kernel there. Tests run on the CPU;
  to test the kernel there too, give the CPU your kernel inside a switch, as ``_fused.inductor_on_cpu()`` does
  for CUDA's, and add that switch's row to ``tests/helpers.py`` next to ``"fused-inductor"``.
* **Another implementation** (an 8-bit-state step, a multi-tensor Triton step): write one module with a
  :class:`StepFunction` and add one row to ``BACKENDS``: its step, the constructor ``options`` that select it,
  the param devices and dtypes it accepts and the ``state_dtypes`` it can keep moments in. Every test
  parametrized over ``tests/helpers.py::IMPLEMENTATIONS`` (parity with the float64 reference, checkpoints,
  hardening, per-coordinate steps, golden trajectories, ...) then runs it, and ``tests/test_structure.py``
  checks that the test table covers every row. The flags ``adamnx.functional.adamnx`` takes (torch's) select
  the three rows there are; a row that needs an option of its own (a ``state_dtype`` only it supports) also
  needs that option in ``AdamNX`` and in ``functional.backend_name``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["FLOATING_DTYPES", "Backend", "Hyperparameters", "StepFunction"]

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Hyperparameters:
    """The hyperparameters of one step of one param group, as every step function receives them.

    Built once per call of :func:`adamnx.functional.adamnx` (also inside ``torch.compile(opt.step)``, where it is
    traced like any Python object). ``lr`` may be a 0-d Tensor (a scheduler's, or a traced one).
    """

    beta1: float
    beta2: float
    lr: float | Tensor
    weight_decay: float
    eps: float
    maximize: bool
    stochastic_rounding: bool = False


class StepFunction(Protocol):
    """One AdamNX step of flat lists of tensors, in place: the signature of every row of ``BACKENDS``.

    ``has_complex``, ``capturable`` and ``differentiable`` say how to run it, ``hp`` what to compute, and
    ``coord_steps`` (or None) holds the per-coordinate step counts (``per_coordinate_steps``).
    """

    def __call__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        hp: Hyperparameters,
        *,
        has_complex: bool,
        capturable: bool,
        differentiable: bool,
        coord_steps: list[Tensor] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Backend:
    """One row of the backend table: the step function of an implementation and what it supports.

    ``options``: the constructor flags that select it (``AdamNX(params, **options)``). ``devices``: the device
    types of the params it steps, ``None`` for any; ``dtypes``: the real dtypes of the params it steps, ``None``
    for any (complex params always run, as float views). ``state_dtypes``: what ``state_dtype`` may be.
    ``prepare``: called before a step with the device types of its params, to build what the step needs (a C++
    kernel) while nothing has changed yet. ``capturable``: ``capturable=True`` runs another path of its step
    (then the tests run that too).
    """

    step: StepFunction
    options: Mapping[str, bool]
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    state_dtypes: tuple[torch.dtype, ...] = FLOATING_DTYPES
    prepare: Callable[[set[str]], None] | None = None
    capturable: bool = False

    def option(self) -> str:
        """The options that select it, as a user writes them: ``fused=True``."""
        return ", ".join(f"{key}={value}" for key, value in self.options.items())
