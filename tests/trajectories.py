"""Trajectories recorded before the plan/executor redesign (issue #21), and the scenarios that make them.

Every implementation of the test table runs every scenario it supports (a float32, float64, bf16, fp16, complex, awkward
layout, tensor-lr, param-group, missed-step, checkpoint, GradScaler and late-activation-guard run, about 30 steps
each) and its final state (`state_dict()` and the params) is compared with what the code gave before the redesign:
bitwise where the machine computes like the one that recorded it, else within a few float32 ulps.

    python tests/trajectories.py    # (re)record tests/recorded/trajectories.json: only when the bits are meant to change
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch

from helpers import IMPLEMENTATIONS, gradient_sequence, initial_params, takes_tensor_lr

GOLDEN = Path(__file__).with_name("recorded") / "trajectories.json"

SHAPES = [(5, 3), (7,), (2, 3, 4), (), (16, 8)]
STEPS = 30
HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.01}


def machine() -> str:
    """What decides the last bits of a run besides the code: torch's build and the vector instructions it uses."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {platform.machine()}, {capability}"


def _guard_gradients(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Params and gradients for the late-activation guard: a dense matrix whose coordinates all start at step 1
    but a few (zero first gradients), an embedding whose rows start whole at different steps (and one in part),
    a bias that starts at step 12, a matrix whose coordinates start one by one, and a tensor that never starts.
    Every 7th step every gradient is zero."""
    shapes = [(16, 8), (32, 4), (6,), (4, 5), (3, 3)]
    params = initial_params(shapes, seed=3)
    grads = gradient_sequence(STEPS, shapes=shapes, seed=4)
    row_start = torch.arange(32) % 9 * 3 + 1  # rows start at steps 1, 4, ..., 25
    element_start = (torch.arange(20).reshape(4, 5) * 7) % 29 + 1
    for t, step in enumerate(grads, start=1):
        dense, emb, bias, elements, never = step
        if t == 1:
            dense[0, :3] = 0.0  # three coordinates start later
        emb[row_start > t] = 0.0
        if t < 10:
            emb[5, :2] = 0.0  # row 5 starts in part at step 1, wholly at step 10
        if t < 12:
            bias.zero_()
        elements[element_start > t] = 0.0
        never.zero_()
        if t % 7 == 0:
            for g in step:
                g.zero_()
    return [p.to(dtype) for p in params], [[g.to(dtype) for g in step] for step in grads]


def _plain_gradients(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    params = initial_params(SHAPES, seed=1)
    grads = gradient_sequence(STEPS, shapes=SHAPES, seed=2)
    return [p.to(dtype) for p in params], [[g.to(dtype) for g in step] for step in grads]


def _scenario(name: str):
    """(params0, grads per step, constructor kwargs, options): the run a scenario makes."""
    dtype = {"f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}.get(name.split("-")[0], torch.float32)
    guard = "guard" in name
    params, grads = (_guard_gradients if guard else _plain_gradients)(dtype)
    kwargs = dict(HYPER, per_coordinate_steps=guard)
    options: dict = {}
    if "max" in name:
        kwargs.update(maximize=True, betas=(0.8, 0.9), weight_decay=0.1)
    if "f32state" in name:
        kwargs["state_dtype"] = torch.float32
    if "sr" in name.split("-"):
        kwargs["stochastic_rounding"] = True
    if "complex" in name:
        params = [torch.complex(p, p.flip(0) if p.dim() else -p) for p in params]
        grads = [[torch.complex(g, 0.5 * g) for g in step] for step in grads]
    if "tensorlr" in name:
        kwargs["lr"] = torch.tensor(1e-2)
    if "layout" in name:
        options["layout"] = True
    if "missed" in name:  # a param that gets no gradient at some steps: its step count falls behind the others'
        for t, step in enumerate(grads):
            if t % 4 == 1:
                step[1] = None
    if "ckpt" in name:
        options["checkpoint_at"] = 13
    if "groups" in name:
        options["groups"] = True
    if "amp" in name:
        options["amp"] = True
    return params, grads, kwargs, options


SCENARIOS = [
    "f32",
    "f64-max",
    "bf16",
    "bf16-f32state",
    "f16-f32state",
    "bf16-sr",
    "bf16-f32state-sr",
    "f32-complex",
    "f32-tensorlr",
    "f32-layout",
    "f32-missed",
    "f32-ckpt",
    "f32-groups",
    "f32-amp",
    "f32-guard",
    "f64-guard-max",
    "bf16-guard-f32state",
    "bf16-guard-sr",
    "f32-guard-ckpt",
    "f32-guard-missed",
    "f32-guard-amp",
    "f32-guard-complex",
    "f32-guard-layout",
]


def supports(impl: str, scenario: str) -> bool:
    """Whether the implementation runs the scenario (what it refuses is tested elsewhere)."""
    if "amp" in scenario:
        return IMPLEMENTATIONS[impl].backend.amp
    if "tensorlr" in scenario:
        return takes_tensor_lr(impl)
    return True


def _layout(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The matrices transposed (not contiguous) and the 3-d tensor as a permuted view: awkward strides."""
    out = []
    for p in params:
        if p.dim() == 2:
            p = p.t().contiguous().t()
        elif p.dim() == 3:
            p = p.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        out.append(p)
    return out


def run(impl: str, scenario: str) -> dict[str, torch.Tensor]:
    """Run a scenario on an implementation; its final params and state dict, flattened to name → tensor."""
    params0, grads, kwargs, options = _scenario(scenario)
    torch.manual_seed(0)  # stochastic rounding draws from torch's generator
    params = [p.clone() for p in params0]
    if options.get("layout"):
        params = _layout(params)
    params = [p.requires_grad_(True) for p in params]
    build = IMPLEMENTATIONS[impl]

    def make(ps):
        if options.get("groups"):
            return build(
                [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-2, "betas": (0.5, 0.95), "weight_decay": 0.0}],
                **kwargs,
            )
        return build(ps, **kwargs)

    opt = make(params)
    for t, step in enumerate(grads):
        if t == options.get("checkpoint_at"):
            saved = copy.deepcopy(opt.state_dict())
            opt = make(params)
            opt.load_state_dict(saved)
        scale = 1024.0 if options.get("amp") else 1.0
        for p, g in zip(params, step):
            g = None if g is None else (g * scale).to(p.dtype)
            if g is not None and options.get("layout") and p.dim() == 2:  # the grad in the param's layout
                g = torch.empty_like(p).copy_(g)
            p.grad = g
        if options.get("amp"):
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(1.0 if t == 9 else 0.0)  # GradScaler found an inf at step 10: skipped
        opt.step()
    out = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"state{pid}.{key}"] = torch.as_tensor(value).clone()
    return out


def summary(tensor: torch.Tensor) -> list:
    """A tensor's exact bits (a hash of its dtype, shape and bytes, a zero's sign aside) and, for machines that round differently, its sum
    and the sum of its absolute values (float64, to 9 digits)."""
    t = tensor.detach().cpu().contiguous()
    real = torch.view_as_real(t) if t.is_complex() else t
    if real.is_floating_point():  # -0.0 as 0.0: torch.lerp's scalar and tensor-weight loops differ in a zero's sign
        real = real + 0.0
    digest = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} ".encode())
    digest.update(real.reshape(-1).view(torch.uint8).numpy().tobytes())
    wide = real.double()
    return [digest.hexdigest()[:16], float(f"{wide.sum().item():.9g}"), float(f"{wide.abs().sum().item():.9g}")]


def record() -> None:
    results = {
        f"{impl}/{scenario}": {name: summary(t) for name, t in run(impl, scenario).items()}
        for impl in IMPLEMENTATIONS
        for scenario in SCENARIOS
        if supports(impl, scenario)
    }
    lines = [f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}" for key, value in sorted(results.items())]
    GOLDEN.write_text(f'{{"machine": {json.dumps(machine())}, "results": {{\n' + ",\n".join(lines) + "\n}}\n")
    print(f"recorded {len(results)} runs on {machine()} into {GOLDEN}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    record()
