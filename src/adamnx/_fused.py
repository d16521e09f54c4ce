"""The fused AdamNX step: one pass over memory per tensor (read p, g, m, v once; write p, m, v once).

Two kernels apply the same math, in the for-loop path's order of operations, with the same coefficients
(:func:`adamnx.schedule.coefficients`, evaluated once per step for all tensors):

* CPU: a C++ kernel (``csrc/fused_cpu.cpp``, built on first use by :mod:`adamnx._cpu_extension`), called once per
  step for every tensor of a dtype: one parallel region, no Python or dispatch per tensor. This is what makes it
  as fast as torch's fused AdamW on models with many small tensors.
* CUDA: a TorchInductor-generated kernel (:func:`_adamnx_kernel` → Triton), CHUNK
  tensors per compiled call. Every scalar (coefficients, lr, the maximize sign, GradScaler's scale and found_inf)
  enters as a 0-d tensor on the device and tensors as 1-D views with a dynamic length, so it compiles once per
  (device, dtype[, GradScaler][, stochastic rounding]) and never again for a new step, learning rate or shape;
  with no host sync it is CUDA-graph capturable. Tensors of 0 or 1 elements (which dynamo would specialise) and
  tensors whose memory is not one dense block shared by p, g, m, v run the same function eagerly.

Low-precision params get float32 math on both.

:func:`fused_adamnx` is the ``"fused"`` row of ``adamnx.functional.BACKENDS``; it steps each group of tensors
sharing a device and dtype with that device's kernel, the row of :data:`FUSED_KERNELS` (device type → kernel),
whose keys are the devices ``fused=True`` accepts. A kernel for another device is one module and one row there
(see :mod:`adamnx._backends`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings

import torch
from torch import Tensor

from adamnx import _cpu_extension
from adamnx._backends import Hyperparameters
from adamnx._tensors import (
    BY_ELEMENT,
    BY_ROW,
    MAX_COUNT,
    MIN_TRACKED_NUMEL,
    ON_STEP,
    GatheredCoordinates,
    advance_counts,
    coordinate_table,
    count_coefficients,
    dense_1d_views,
    forget_counts,
    group_by_device_and_dtype,
    host_coefficients,
    known_counts,
    math_dtype,
    note_counts,
    observe_counts,
    off_step_coordinates,
    stochastic_round_to_bf16,
)
from adamnx.schedule import coefficients

__all__ = ["FUSED_KERNELS", "fused_adamnx", "prepare_fused"]


def _adamnx_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    one_minus_beta1_t: Tensor,
    beta2_hat: Tensor,
    one_minus_beta2_hat: Tensor,
    neg_lr: Tensor,
    neg_lr_wd: Tensor,
    eps: Tensor,
    grad_factor: Tensor,
    found_inf: Tensor | None,
    stochastic: bool = False,
    count: Tensor | None = None,
    table: Tensor | tuple[float, float] | None = None,
) -> None:
    """One AdamNX step on one tensor; the operations of the for-loop path, in its order, in registers.

    The scalars arrive already rounded to the math dtype (float64 for float64 params, else float32), as the
    other paths' kernels round their Python floats. With per_coordinate_steps, ``count`` (int32, shaped like the
    param) advances here and the coefficients are gathered from ``table`` by count, or evaluated per element when
    ``table`` is the betas (counts too long for a table); the three coefficient arguments are then unused: see
    :func:`adamnx._tensors.coordinate_table`.
    """
    math_dtype = neg_lr.dtype
    g = grad.to(math_dtype) * grad_factor  # ±1/grad_scale: maximize and GradScaler's unscale in one factor
    if count is not None:
        new_count = advance_counts(count, g)
        one_minus_beta1_t, beta2_hat, one_minus_beta2_hat = count_coefficients(table, new_count, math_dtype)
    p = param.to(math_dtype)
    p = p + neg_lr_wd * p
    m = torch.lerp(exp_avg.to(math_dtype), g, one_minus_beta1_t)
    v = exp_avg_sq.to(math_dtype) * beta2_hat + one_minus_beta2_hat * (g * g)
    p = p + neg_lr * (m / (v.sqrt() + eps))
    p = stochastic_round_to_bf16(p) if stochastic else p.to(param.dtype)
    m, v = m.to(exp_avg.dtype), v.to(exp_avg_sq.dtype)
    if found_inf is not None:  # a GradScaler is in use (a second graph, compiled only then)
        # it found inf/NaN: keep everything as it was (torch's fused optimizers do the same)
        skip = found_inf != 0
        p, m, v = torch.where(skip, param, p), torch.where(skip, exp_avg, m), torch.where(skip, exp_avg_sq, v)
        if count is not None:
            new_count = torch.where(skip, count, new_count)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if count is not None:
        count.copy_(new_count)


# True inside inductor_on_cpu(): the accelerator (inductor) kernel runs on the CPU, where CI can check it.
INDUCTOR_ON_CPU = False


@contextlib.contextmanager
def inductor_on_cpu():
    """Run fused=True's accelerator kernel (TorchInductor) for CPU tensors instead of the C++ kernel: for tests."""
    global INDUCTOR_ON_CPU
    previous, INDUCTOR_ON_CPU = INDUCTOR_ON_CPU, True
    try:
        yield
    finally:
        INDUCTOR_ON_CPU = previous


CHUNK = 8  # tensors per compiled call: amortises the call's ~50–100 µs of Python and guard overhead


def _adamnx_chunk(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    w1s,
    b2s,
    w2s,
    neg_lr,
    neg_lr_wd,
    eps,
    grad_factor,
    found_inf,
    counts=None,
    table=None,
    stochastic=False,
):
    """CHUNK tensors in one compiled call: the per-tensor kernel, unrolled (one fused loop per tensor)."""
    for i in range(CHUNK):
        _adamnx_kernel(
            params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], w1s[i], b2s[i], w2s[i],
            neg_lr, neg_lr_wd, eps, grad_factor, found_inf, stochastic,
            None if counts is None else counts[i], table,
        )  # fmt: skip


@functools.cache
def _compiled_chunk(device_type: str, dtype: torch.dtype, amp: bool, stochastic: bool, per_coordinate: bool):
    """The compiled chunk kernel for one (device type, dtype, GradScaler or not, stochastic rounding or not,
    per-coordinate counts or not).

    Each key gets its own copy of the code object, because dynamo keeps one cache (of at most 8 graphs) per
    code object: dtypes × devices × AMP would otherwise overflow it and fall back to eager.
    """
    flags = "".join(name for name, on in (("_amp", amp), ("_sr", stochastic), ("_pc", per_coordinate)) if on)
    code = _adamnx_chunk.__code__.replace(co_name=f"_adamnx_chunk_{device_type}_{str(dtype)[6:]}{flags}")
    # The flag becomes this copy's default (a functools.partial would share one dynamo wrapper between keys).
    kernel = types.FunctionType(code, _adamnx_chunk.__globals__, code.co_name, (stochastic,))
    return torch.compile(kernel, dynamic=True, fullgraph=True)


@functools.cache
def _padding(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> tuple[list[Tensor], ...]:
    """Dummy (p, g, m, v[, counts]) tensors of 2 elements that fill the last chunk (their updates are discarded)."""
    return tuple([torch.zeros(2, dtype=dtype, device=device) for _ in range(CHUNK)] for dtype in dtypes)


# Graphs dynamo may keep per kernel (its default is 8 per code object). Each key already has its own code object;
# within one, a long program still meets a few variants (params that do or do not require grad, ...), and with
# fullgraph=True reaching the limit is a hard error in the middle of a step.
_RECOMPILE_LIMIT = 64


def _kernel_config():
    """The compile settings of the chunk kernel's calls: no duck shapes, and room for more graphs."""
    stack = contextlib.ExitStack()
    stack.enter_context(_no_duck_shapes())
    with contextlib.suppress(AttributeError):  # older torch: its own limit
        import torch._dynamo.config as dynamo_config

        if dynamo_config.recompile_limit < _RECOMPILE_LIMIT:
            stack.enter_context(dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT))
    return stack


def _no_duck_shapes():
    """Tensors of equal length must not share a size symbol, or a chunk with other lengths would recompile."""
    try:
        from torch.fx.experimental import _config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except (ImportError, AttributeError):  # pragma: no cover - older torch: at worst a few recompilations
        return contextlib.nullcontext()


def _is_compiler_missing(exc: BaseException) -> bool:
    """Whether inductor failed because this machine cannot build its kernel (no C++ compiler / Triton)."""
    while exc is not None:
        if type(exc).__name__ in ("InvalidCxxCompiler", "CppCompileError") or "triton" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _run_compiled(
    chunks: list[list[Tensor]], coeffs: list[Tensor], scalars: tuple, stochastic: bool, table: Tensor | None = None
) -> None:
    """Run the compiled kernel over ``chunks`` = [params, grads, exp_avgs, exp_avg_sqs(, counts)] (1-D views),
    CHUNK at a time."""
    first = chunks[0][0]
    n = len(chunks[0])
    pad = (-n) % CHUNK
    if pad:
        dummies = _padding(first.device, tuple(lst[0].dtype for lst in chunks))
        chunks = [lst + dummy[:pad] for lst, dummy in zip(chunks, dummies)]
        coeffs = [torch.cat([c, c.new_zeros(pad)]) for c in coeffs]
    per_coordinate = table is not None
    tensors, counts = chunks[:4], (chunks[4] if per_coordinate else None)
    key = (first.device.type, first.dtype, scalars[-1] is not None, stochastic, per_coordinate)
    start = 0 if key in _UNCOMPILABLE else None
    if start is None:
        kernel = _compiled_chunk(*key)
        with _kernel_config():
            for c in range(0, n + pad, CHUNK):
                try:
                    kernel(
                        *(lst[c : c + CHUNK] for lst in tensors), *(w[c : c + CHUNK] for w in coeffs), *scalars,
                        None if counts is None else counts[c : c + CHUNK], table,
                    )  # fmt: skip
                except Exception as exc:
                    if not _is_compiler_missing(exc):
                        raise
                    # Raising now would leave the chunks (and the groups and dtypes) before this one stepped:
                    # finish the step with the same function, eagerly, say so once, and not try again.
                    _warn_eager_fallback(first, exc)
                    _UNCOMPILABLE.add(key)
                    start = c
                    break
    if start is not None:
        for i in range(start, n):
            _adamnx_kernel(
                *(lst[i] for lst in tensors), *(w[i] for w in coeffs), *scalars, stochastic,
                None if counts is None else counts[i], table,
            )  # fmt: skip


_UNCOMPILABLE: set[tuple] = set()  # kernels inductor could not build on this machine: run eagerly


@functools.cache  # once per device type and dtype
def _warn_eager_fallback_once(device_type: str, dtype: torch.dtype, reason: str) -> None:
    warnings.warn(
        f"fused=True could not compile its {dtype} kernel for {device_type} with TorchInductor (which needs Triton "
        f"on CUDA, a C++ compiler on the CPU): {reason}. The same math runs eagerly instead, correct but slow: "
        "install Triton, or use foreach=True.",
        stacklevel=6,
    )


def _warn_eager_fallback(tensor: Tensor, exc: BaseException) -> None:
    _warn_eager_fallback_once(
        tensor.device.type, tensor.dtype, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    )


def fused_adamnx(
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
) -> None:
    if not params:
        return
    if differentiable:
        raise RuntimeError("`fused` does not support `differentiable=True`")
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps, *([coord_steps] if coord_steps is not None else []))
    for d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps, *d_counts in group_by_device_and_dtype(*lists):
        step = _kernel(d_params[0].device.type)
        stochastic = hp.stochastic_rounding and d_params[0].dtype == torch.bfloat16
        step(
            d_params, d_grads, d_exp_avgs, d_exp_avg_sqs, d_steps, grad_scale, found_inf, hp,
            has_complex=has_complex, stochastic=stochastic, counts=d_counts[0] if d_counts else None,
        )  # fmt: skip


def _kernel(device_type: str):
    """The row of FUSED_KERNELS that steps this device type's tensors. Inside inductor_on_cpu() the CPU gets CUDA's
    (the inductor kernel); so does a device without a row, which only the functional form lets through."""
    if device_type == "cpu" and INDUCTOR_ON_CPU:
        device_type = "cuda"
    return FUSED_KERNELS.get(device_type, FUSED_KERNELS["cuda"])


def prepare_fused(device_types: set[str]) -> None:
    """The fused row's ``prepare``: build or load the C++ kernel before a step of CPU tensors changes anything."""
    if "cpu" in device_types:
        ensure_cpu_kernel()


@torch.compiler.disable  # under torch.compile(opt.step): plain Python (the CPU kernel runs outside graphs anyway)
def ensure_cpu_kernel() -> None:
    """Build or load the CPU kernel (a no-op once loaded, or when tests run the inductor kernel instead)."""
    if not INDUCTOR_ON_CPU:
        _cpu_extension.load()


def _real_views(*tensor_lists: list[Tensor]) -> list[list[Tensor]]:
    """Complex tensors as their float views (the update is elementwise on real and imaginary parts alike)."""
    return [[torch.view_as_real(t) if torch.is_complex(t) else t for t in lst] for lst in tensor_lists]


@functools.lru_cache(maxsize=64)
def _shared_coefficients(step: float, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """One-element float64 tensors of a step's coefficients (read, never written, by the kernel)."""
    return tuple(torch.tensor([w], dtype=torch.float64) for w in host_coefficients(step, beta1, beta2))


# Under torch.compile(opt.step) the C++ kernel runs as it is, outside the graph: tracing into it would gain nothing.
@torch.compiler.disable
def _cpu_step(
    params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, found_inf, hp,
    *, has_complex, stochastic, counts=None,
) -> None:  # fmt: skip
    """One step of CPU tensors sharing a dtype: the C++ kernel, one call for all of them."""
    beta1, beta2, lr, weight_decay, eps, maximize = hp.beta1, hp.beta2, hp.lr, hp.weight_decay, hp.eps, hp.maximize
    ops = _cpu_extension.load()
    # On the CPU, reading GradScaler's tensors costs nothing (no device to sync with).
    if found_inf is not None and found_inf.item():
        return  # it found inf/NaN: params, moments and counters stay as they were (as in torch's fused Adam)
    grad_factor = -1.0 if maximize else 1.0  # maximize and GradScaler's unscale in one factor
    if grad_scale is not None:
        grad_factor /= grad_scale.item()
    lr = lr.item() if isinstance(lr, Tensor) else lr
    if has_complex:
        params, grads, exp_avgs, exp_avg_sqs = _real_views(params, grads, exp_avgs, exp_avg_sqs)
    tensors = [params, grads, exp_avgs, exp_avg_sqs, *([counts] if counts is not None else [])]
    shards = type(params[0]).__name__ == "DTensor"
    if shards:  # FSDP2 shards: the update is elementwise, so local shards suffice
        tensors = [[t.to_local() for t in lst] for lst in tensors]
    # What is known of the counts, read before this step advances the counters (see known_counts); local shards
    # are new tensors at every step, so nothing is kept for them.
    knowns = [None] * len(steps) if shards or counts is None else [known_counts(c, s) for c, s in zip(counts, steps)]
    step_counts = torch.empty(len(steps), dtype=torch.float64)
    common = ops.advance_steps_(steps, 1.0, step_counts)
    if math.isnan(common):  # counters differ (a param that missed steps): coefficients per tensor
        w1s, w2s = coefficients(step_counts, (beta1, beta2))
    else:  # one count for the group, the usual case: one pair of coefficients, computed on the host
        w1s, w2s = _shared_coefficients(common, beta1, beta2)
    kernel = _CpuKernel(ops, w1s, w2s, lr, weight_decay, eps, grad_factor, stochastic, (beta1, beta2), step_counts)
    if counts is None:
        kernel(tensors)
        return
    # Tensors whose counts are on their step (ON_STEP) take their own coefficients, as without the guard, and
    # their counts are only written; their exceptions are gathered first and updated as tensors of their own.
    # Tensors whose counts are constant by row (BY_ROW) read one count per row.
    step_values = step_counts.tolist()
    fill, rows, exceptions = [-1] * len(steps), [_NO_ROWS] * len(steps), []
    for i, known in enumerate(knowns):
        if known is None or not 1 < step_values[i] < MAX_COUNT - 1:
            continue
        if known.kind == ON_STEP:
            gathered = None
            if known.exceptions is not None:
                gathered = GatheredCoordinates.save([t[i] for t in tensors], known.exceptions)
            if known.exceptions is None or gathered is not None:
                fill[i] = int(step_values[i])
                if gathered is not None:
                    exceptions.append((i, gathered))
        elif known.kind == BY_ROW and tensors[0][i].is_contiguous() and tensors[4][i].is_contiguous():
            rows[i] = _row_counts(tensors[4][i], known.rows)
    left, rows_broken = kernel(tensors, exceptions, torch.tensor(fill, dtype=torch.int64), rows)
    for _, gathered in exceptions:
        gathered.write_back(counts=True)
    if not shards:
        _note_after_step(tensors[4], steps, step_values, knowns, fill, rows, rows_broken, left)


_NO_ROWS = torch.empty(0, dtype=torch.int32)  # fused_step_'s rows argument for a tensor not walked by row


def _row_counts(count: Tensor, before: Tensor | None) -> Tensor:
    """fused_step_'s (2, R) rows of a BY_ROW tensor: each row's count before the step (kept from the last step, or
    read off its first column) and room for the counts after it."""
    rows = torch.empty(2, count.shape[0], dtype=torch.int32)
    rows[0].copy_(before if before is not None else count.view(count.shape[0], -1)[:, 0])
    return rows


def _note_after_step(counts, steps, step_values, knowns, fill, rows, rows_broken, left) -> None:
    """What is known of each tensor's counts after the C++ kernel's step (see known_counts)."""
    left = set(left)
    for i, (count, known) in enumerate(zip(counts, knowns)):
        if i in left:  # updated eagerly, element by element
            forget_counts(count)
        elif fill[i] >= 0:  # on its step still, at the versions this step left
            note_counts(count, steps[i], *known)
        elif rows[i].numel():
            if i in rows_broken:  # a row started in part: looked at again after the next step
                forget_counts(count)
            else:
                note_counts(count, steps[i], BY_ROW, rows=rows[i][1])
        elif known is not None:  # the kernel walked the counts element by element
            note_counts(count, steps[i], BY_ELEMENT)
        elif count.numel() >= MIN_TRACKED_NUMEL:  # looked at once (the kernel walks any counts)
            note_counts(count, steps[i], *observe_counts(count, step_values[i]))


class _CpuKernel:
    """The C++ kernel with one step's scalars."""

    def __init__(self, ops, w1s, w2s, lr, weight_decay, eps, grad_factor, stochastic, betas, step_counts) -> None:
        self.ops, self.w1s, self.w2s, self.betas, self.step_counts = ops, w1s, w2s, betas, step_counts
        self.lr, self.weight_decay, self.eps, self.grad_factor, self.stochastic = (
            lr, weight_decay, eps, grad_factor, stochastic
        )  # fmt: skip

    def __call__(
        self, tensors: list[list[Tensor]], gathered=(), fill: Tensor | None = None, rows=()
    ) -> tuple[list[int], set[int]]:
        """Update the tensors (lists of params, grads, exp_avgs, exp_avg_sqs and, with per_coordinate_steps,
        counts) and the gathered coordinates (pairs of the tensor's index and its GatheredCoordinates), whose
        counts are their own; ``fill``: the kernel's per-tensor count to write (−1: walk the counts); ``rows``:
        fused_step_'s rows, per tensor. Returns the tensors updated eagerly instead and those whose rows broke."""
        lists = [list(lst) for lst in tensors]
        for _, copies in gathered:
            for lst, copy in zip(lists, copies.copies):
                lst.append(copy)
        if gathered:
            order = list(range(len(tensors[0]))) + [i for i, _ in gathered]  # for each tensor's coefficients
            w1s, w2s = (w if w.numel() == 1 else w[order] for w in (self.w1s, self.w2s))
            fill = torch.cat([fill, fill.new_full((len(gathered),), -1)])
            if rows:
                rows = [*rows, *[_NO_ROWS] * len(gathered)]
        else:
            w1s, w2s = self.w1s, self.w2s
        params, grads, exp_avgs, exp_avg_sqs, *counts = lists
        counts = counts[0] if counts else []
        dtype, cpu = math_dtype(params[0], exp_avgs[0]), torch.device("cpu")
        max_step = self.step_counts.max()  # a coordinate's count is at most its tensor's step
        table = _NO_TABLE
        if counts:
            table = coordinate_table(max_step, counts, *self.betas, dtype, cpu)
        rows_broken = torch.zeros(len(params) if rows else 0, dtype=torch.int32)
        if table is None:  # counts too long for a table: every tensor evaluates its coefficients per element, eagerly
            left = range(len(params))
        else:
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) if self.stochastic else 0
            left = self.ops.fused_step_(
                params, grads, exp_avgs, exp_avg_sqs, counts, w1s, w2s, table, _NO_TABLE if fill is None else fill,
                list(rows), rows_broken,
                self.lr, self.weight_decay, self.eps, self.grad_factor, self.stochastic, seed,
            )  # fmt: skip
        for k in left:  # layouts or dtype pairs the kernel cannot walk in one pass: the same math, eagerly
            dtype = math_dtype(params[k], exp_avgs[k])
            scalars = [
                torch.tensor(x, dtype=torch.float64).to(dtype)
                for x in (-self.lr, -self.lr * self.weight_decay, self.eps, self.grad_factor)
            ]
            w1, w2 = (w[k if w.numel() > 1 else 0] for w in (w1s, w2s))
            coeffs = [c.to(dtype) for c in (w1, 1 - w2, w2)]
            per_coordinate = ()
            if counts:
                own_table = coordinate_table(max_step, [counts[k]], *self.betas, dtype, cpu)
                per_coordinate = (counts[k], self.betas if own_table is None else own_table)
            _adamnx_kernel(
                params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], *coeffs, *scalars, None, self.stochastic,
                *per_coordinate,
            )  # fmt: skip
        return list(left), set(rows_broken.nonzero().view(-1).tolist())


_NO_TABLE = torch.empty(0)  # fused_step_'s table argument without per_coordinate_steps


def _compiled_step(
    params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, found_inf, hp,
    *, has_complex, stochastic, counts=None,
) -> None:  # fmt: skip
    """One step of accelerator tensors sharing a device and dtype: the inductor kernel, no host sync (one, to size
    the coefficient table, with per_coordinate_steps)."""
    beta1, beta2, lr, weight_decay, eps, maximize = hp.beta1, hp.beta2, hp.lr, hp.weight_decay, hp.eps, hp.maximize
    device = params[0].device
    dtype = math_dtype(params[0], exp_avgs[0])
    f64 = {"dtype": torch.float64, "device": device}
    # torch.full launches a fill kernel where torch.tensor would copy from the host: capturable in a CUDA graph
    lr_t = lr.to(**f64) if isinstance(lr, Tensor) else torch.full((), lr, **f64)
    grad_factor = torch.full((), -1.0 if maximize else 1.0, **f64)
    if grad_scale is not None:
        grad_factor = grad_factor / grad_scale.to(**f64)
    inf_t = None if found_inf is None else found_inf.to(device=device, dtype=dtype)
    # Separate tensors, not views of one stack: inputs aliasing each other would make dynamo recompile.
    shared = [t.to(dtype) for t in (-lr_t, lr_t * -weight_decay, torch.full((), eps, **f64), grad_factor)]

    # The counter does not advance on a skipped (inf) step, as in torch's fused Adam. It is advanced last, so that
    # a kernel that fails to compile (no Triton) leaves the counters as they were, like everything else.
    increment = 1.0 if inf_t is None else 1 - inf_t.to(steps[0].device, steps[0].dtype)
    # One vectorised evaluation of the coefficients for the whole group, on the device, no host sync;
    # β̂2 = 1 − w2 is formed in float64, then everything is rounded to the math dtype once.
    new_steps = torch.stack(steps) + increment
    w1s, w2s = coefficients(new_steps.to(device), (beta1, beta2))
    coeffs = [c.to(dtype) for c in (w1s, 1 - w2s, w2s)]
    scalars = (*shared, inf_t)
    views = _real_views(params, grads, exp_avgs, exp_avg_sqs)
    if counts is None:
        _run_accelerator_kernel(views, range(len(params)), coeffs, scalars, stochastic, None)
        torch._foreach_add_(steps, increment)
        return

    # per_coordinate_steps. Tensors whose counts are all on their step (ON_STEP, without exceptions) take the
    # kernel without counts, as without the guard, and their counts advance with their step; the others gather
    # their coefficients from the table (which one host sync sizes), or evaluate them per element without one.
    knowns = [known_counts(c, s) for c, s in zip(counts, steps)]
    host_steps = new_steps.cpu()
    own = [
        i
        for i, known in enumerate(knowns)
        if known is not None and known[0] == ON_STEP and known[1] is None and 1 < host_steps[i] < MAX_COUNT - 1
    ]
    rest = [i for i in range(len(params)) if i not in own]
    if own:
        _run_accelerator_kernel(views, own, coeffs, scalars, stochastic, None)
    if rest:  # a coordinate's count is at most its tensor's step
        table = coordinate_table(host_steps.max(), [counts[i] for i in rest], beta1, beta2, dtype, device)
        # None: counts too long for a table; each tensor then evaluates its coefficients per element, eagerly
        table = (beta1, beta2) if table is None else table
        _run_accelerator_kernel([*views, counts], rest, coeffs, scalars, stochastic, table)
    count_increment = 1 if inf_t is None else increment.to(torch.int32)
    for i in own:
        counts[i].add_(count_increment)  # skipped (inf) with the step, so the counts stay on it
    torch._foreach_add_(steps, increment)
    for i, known in enumerate(knowns):
        if type(counts[i]) is not Tensor:
            continue
        if i in own:
            note_counts(counts[i], steps[i], *known)
        elif known is not None:  # the kernel walked the counts element by element: rows may no longer hold
            note_counts(counts[i], steps[i], BY_ELEMENT)
        elif inf_t is None and counts[i].numel() >= MIN_TRACKED_NUMEL:  # looked at once (a skipped step: not yet)
            off = off_step_coordinates(counts[i], float(steps[i]))
            note_counts(counts[i], steps[i], ON_STEP if off is not None and not off.numel() else BY_ELEMENT)


def _run_accelerator_kernel(views, indices, coeffs, scalars, stochastic, table) -> None:
    """The inductor kernel on tensors ``indices`` of ``views`` (params, grads, exp_avgs, exp_avg_sqs[, counts]),
    CHUNK at a time; single elements and tensors that are not one dense block, eagerly."""
    compiled: list[list[Tensor]] = [[] for _ in views]
    compiled_idx: list[int] = []
    eager: list[tuple[int, tuple[Tensor, ...]]] = []
    for i in indices:
        tensors = [lst[i] for lst in views]
        numel = tensors[0].numel()
        flat = dense_1d_views(tensors) if numel > 1 and not isinstance(table, tuple) else None
        if flat is not None:
            compiled_idx.append(i)
            for lst, t in zip(compiled, flat):
                lst.append(t)
        elif numel:  # 1 element (dynamo would specialise it) or not one dense block: same function, eager
            eager.append((i, tensors))
    if compiled_idx:
        every = len(compiled_idx) == len(views[0])
        index = None if every else torch.tensor(compiled_idx, device=views[0][0].device)
        chunk_coeffs = coeffs if index is None else [c.index_select(0, index) for c in coeffs]
        _run_compiled(compiled, chunk_coeffs, scalars, stochastic, None if table is None else table)
    for i, tensors in eager:
        _adamnx_kernel(*tensors[:4], *(c[i] for c in coeffs), *scalars, stochastic, *tensors[4:], table)


# fused=True's kernel of each device type (a group of tensors sharing a device and dtype): the devices it accepts.
FUSED_KERNELS = {"cpu": _cpu_step, "cuda": _compiled_step}
