"""The accelerator executor: :func:`adamnx.update.update` compiled by TorchInductor (Triton on CUDA), CHUNK tensors per
compiled call.

Every scalar (coefficients, lr, weight decay, eps, the maximize sign, GradScaler's scale and found_inf) enters as a
0-d tensor on the device and tensors as 1-D views with a dynamic length, so it compiles once per (device, dtype[,
GradScaler][, stochastic rounding][, the guard]) and never again for a new step, learning rate or shape; with no host
sync it is CUDA-graph capturable. Tensors of 0 or 1 elements (which dynamo would specialise) and tensors whose memory
is not one dense block shared by p, g, m, v run the same function eagerly. With the late-activation guard, lags are
per element; the kernel records starts itself and gathers coefficients from the table (one host sync sizes it).

Tests run it on the CPU (``adamnx.backends.selected("fused-inductor")``), where inductor generates C++.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from typing import Any

import torch
from torch import Tensor

from adamnx import guard as guard_module
from adamnx import quantized
from adamnx._dtensor import is_dtensor
from adamnx._table import count_coefficients
from adamnx.backends import loop
from adamnx.backends._pieces import dense_1d_views
from adamnx.plan import Bucket, StepPlan
from adamnx.quantized import update_8bit
from adamnx.schedule import coefficients
from adamnx.update import Weights, moments_in_state_dtype, stochastic_round_to_bf16, update

__all__ = ["execute"]

CHUNK = 8  # tensors per compiled call: amortises the call's ~50–100 µs of Python and guard overhead


def _kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    one_minus_beta1_t: Tensor,
    beta2_hat: Tensor,
    one_minus_beta2_hat: Tensor,
    lr: Tensor,
    weight_decay: Tensor,
    eps: Tensor,
    grad_factor: Tensor,
    found_inf: Tensor | None,
    stochastic: bool = False,
    lag: Tensor | None = None,
    relative: Tensor | None = None,
    new_window: Tensor | None = None,
    table: Tensor | tuple[float, float] | None = None,
) -> None:
    """One AdamNX step on one tensor, out of place in registers, then written back.

    The scalars arrive rounded to the math dtype (``lr.dtype``). With per_coordinate_steps, ``lag`` (int32, shaped like
    the param) gives each coordinate's count ``relative − lag``, whose coefficients are gathered from ``table`` (or
    evaluated per element when ``table`` is the betas); the three coefficient arguments are then unused.
    """
    dtype = lr.dtype
    g = grad.to(dtype) * grad_factor  # ±1/grad_scale: maximize and GradScaler's unscale in one factor
    new_lag: Tensor | None = None
    if lag is not None:
        assert relative is not None and table is not None
        if new_window is not None:  # the step entered a new window: the lags shift to its base
            lag_before = guard_module.shifted_to_window(lag, new_window)
        else:
            lag_before = lag
        last = guard_module.MAX_COUNT if isinstance(table, tuple) else table.shape[1] - 1
        count = (relative - lag_before.to(torch.int64)).clamp(0, last)  # before the starts: t = 1's coefficients too
        one_minus_beta1_t, beta2_hat, one_minus_beta2_hat = count_coefficients(table, count, dtype, clamp=False)
        new_lag = guard_module.lags_after_starts(lag_before, g != 0, relative)
    weights = Weights(one_minus_beta1_t, beta2_hat, one_minus_beta2_hat)
    p, m, v = update(
        param.to(dtype), g, exp_avg.to(dtype), exp_avg_sq.to(dtype), weights, lr, weight_decay, eps, in_place=False
    )
    p = stochastic_round_to_bf16(p) if stochastic else p.to(param.dtype)
    m, v = moments_in_state_dtype(m, v, exp_avg.dtype)  # bf16 state: stochastically, unbiased
    if found_inf is not None:  # a GradScaler is in use (a second graph, compiled only then)
        # it found inf/NaN: keep everything as it was (torch's fused optimizers do the same)
        skip = found_inf != 0
        p, m, v = torch.where(skip, param, p), torch.where(skip, exp_avg, m), torch.where(skip, exp_avg_sq, v)
        if lag is not None and new_lag is not None:
            new_lag = torch.where(skip, lag, new_lag)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if lag is not None and new_lag is not None:
        lag.copy_(new_lag)


def _chunk(
    params, grads, exp_avgs, exp_avg_sqs, w1s, b2s, w2s,
    lr, weight_decay, eps, grad_factor, found_inf,
    lags=None, relatives=None, new_windows=None, table=None, stochastic=False,
):  # fmt: skip
    """CHUNK tensors in one compiled call: the per-tensor kernel, unrolled (one fused loop per tensor)."""
    for i in range(CHUNK):
        _kernel(
            params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], w1s[i], b2s[i], w2s[i],
            lr, weight_decay, eps, grad_factor, found_inf, stochastic,
            *((None, None, None, None) if lags is None else (lags[i], relatives[i], new_windows[i], table)),
        )  # fmt: skip


@functools.cache
def _compiled_chunk(device_type: str, dtype: torch.dtype, amp: bool, stochastic: bool, guarded: bool):
    """The compiled chunk kernel for one (device type, dtype, GradScaler or not, stochastic rounding or not, the
    guard or not).

    Each key gets its own copy of the code object, because dynamo keeps one cache (of at most 8 graphs) per
    code object: dtypes × devices × AMP would otherwise overflow it and fall back to eager.
    """
    flags = "".join(name for name, on in (("_amp", amp), ("_sr", stochastic), ("_pc", guarded)) if on)
    code = _chunk.__code__.replace(co_name=f"_adamnx_chunk_{device_type}_{str(dtype)[6:]}{flags}")
    # The flag becomes this copy's default (a functools.partial would share one dynamo wrapper between keys).
    kernel = types.FunctionType(code, _chunk.__globals__, code.co_name, (None, None, None, None, stochastic))
    return torch.compile(kernel, dynamic=True, fullgraph=True)


@functools.cache
def _padding(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> tuple[list[Tensor], ...]:
    """Dummy (p, g, m, v[, lags]) tensors of 2 elements that fill the last chunk (their updates are discarded)."""
    return tuple([torch.zeros(2, dtype=dtype, device=device) for _ in range(CHUNK)] for dtype in dtypes)


# Graphs dynamo may keep per kernel (its default is 8 per code object). Each key already has its own code object;
# within one, a long program still meets a few variants (params that do or do not require grad, ...), and with
# fullgraph=True reaching the limit is a hard error in the middle of a step.
_RECOMPILE_LIMIT = 64


def _kernel_config() -> contextlib.ExitStack:
    """The compile settings of the chunk kernel's calls: no duck shapes, and room for more graphs."""
    stack = contextlib.ExitStack()
    with contextlib.suppress(ImportError, AttributeError):  # older torch: at worst a few recompilations
        from torch.fx.experimental import _config as fx_config

        # Tensors of equal length must not share a size symbol, or a chunk with other lengths would recompile.
        stack.enter_context(fx_config.patch(use_duck_shape=False))  # type: ignore[attr-defined]
    with contextlib.suppress(AttributeError):  # older torch: its own limit
        import torch._dynamo.config as dynamo_config

        if dynamo_config.recompile_limit < _RECOMPILE_LIMIT:
            stack.enter_context(dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT))
    return stack


def _is_compiler_missing(exc: BaseException | None) -> bool:
    """Whether inductor failed because this machine cannot build its kernel (no C++ compiler / Triton)."""
    while exc is not None:
        if type(exc).__name__ in ("InvalidCxxCompiler", "CppCompileError") or "triton" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_UNCOMPILABLE: set[tuple] = set()  # kernels inductor could not build on this machine: run eagerly


@functools.cache  # once per device type and dtype
def _warn_eager_fallback_once(device_type: str, dtype: torch.dtype, reason: str) -> None:
    warnings.warn(
        f"fused=True could not compile its {dtype} kernel for {device_type} with TorchInductor (which needs Triton "
        f"on CUDA, a C++ compiler on the CPU): {reason}. The same math runs eagerly instead, correct but slow: "
        "install Triton, or use foreach=True.",
        stacklevel=6,
    )


def execute(plan: StepPlan) -> None:
    for b, bucket in enumerate(plan.buckets):
        if bucket.scales is not None:
            _step_8bit_bucket(plan, b, bucket)
        else:
            _step_bucket(plan, bucket)


def _scalars(plan: StepPlan, bucket: Bucket) -> tuple[Any, ...]:
    """lr, weight_decay, eps, grad_factor (±1/GradScaler's scale) as 0-d tensors in the math dtype on the bucket's
    device, and found_inf (or None): a new step, learning rate or scale never recompiles."""
    hp, dtype, device = plan.hp, bucket.math_dtype, bucket.device

    def f64(value: float) -> Tensor:  # a fill kernel, where torch.tensor would copy from the host: capturable
        return torch.full((), value, dtype=torch.float64, device=device)

    lr = hp.lr.to(device=device, dtype=torch.float64) if isinstance(hp.lr, Tensor) else f64(hp.lr)
    grad_factor = f64(-1.0 if hp.maximize else 1.0)
    if plan.grad_scale is not None:
        grad_factor = grad_factor / plan.grad_scale.to(device=device, dtype=torch.float64)
    found_inf = None if plan.found_inf is None else plan.found_inf.to(device=device, dtype=dtype)
    # Separate tensors, not views of one stack: inputs aliasing each other would make dynamo recompile.
    return (*(t.to(dtype) for t in (lr, f64(hp.weight_decay), f64(hp.eps))), grad_factor.to(dtype), found_inf)


def _kernel_8bit(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_absmax: Tensor,
    exp_avg_sq_absmax: Tensor, w1: Tensor, b2: Tensor, w2: Tensor, lr: Tensor, weight_decay: Tensor, eps: Tensor,
    grad_factor: Tensor, found_inf: Tensor | None, stochastic: bool,
) -> None:  # fmt: skip
    """One step of one param with 8-bit moments (:func:`adamnx.quantized.update_8bit`), every scalar a tensor."""
    update_8bit(
        param, grad.to(lr.dtype) * grad_factor, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
        Weights(w1, b2, w2), lr, weight_decay, eps, dtype=lr.dtype, stochastic=stochastic, found_inf=found_inf,
    )  # fmt: skip


@functools.cache
def _compiled_8bit(device_type: str, dtype: torch.dtype, amp: bool, stochastic: bool, guarded: bool) -> Any:
    """The compiled 8-bit kernel for one key (its own code object: dynamo's cache is per code object)."""
    flags = "".join(name for name, on in (("_amp", amp), ("_sr", stochastic), ("_pc", guarded)) if on)
    code = _kernel_8bit.__code__.replace(co_name=f"_adamnx_8bit_{device_type}_{str(dtype)[6:]}{flags}")
    kernel = types.FunctionType(code, _kernel_8bit.__globals__, code.co_name)
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _step_8bit_bucket(plan: StepPlan, b: int, bucket: Bucket) -> None:
    """8-bit moments: the compiled kernel tensor by tensor (blocks are whole tensors' blocks); with the guard, the
    weights per element, and the starts recorded here (on the device) or by the planner's finish (on the host)."""
    assert bucket.scales is not None
    scalars = _scalars(plan, bucket)
    dtype, device, guard = bucket.math_dtype, bucket.device, bucket.guard
    w1s, w2s = coefficients(torch.stack(bucket.steps).to(device), bucket.betas)
    coeffs = [c.to(dtype) for c in (w1s, 1 - w2s, w2s)]
    eager: Any = _kernel_8bit  # (called with unpacked argument tuples)
    for i, param in enumerate(bucket.params):
        # (a DTensor param's local parts: blocks are per shard)
        tensors = quantized.local_tensors(param, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i],
                                          *bucket.scales[i])  # fmt: skip
        if guard is None:
            weights: tuple[Tensor, ...] = tuple(c[i] for c in coeffs)
        elif plan.on_device or is_dtensor(param):
            weights = tuple(loop.local_weights(plan, bucket, i))
        else:
            weights = tuple(bucket.element_coefficients(i))
        key = (device.type, param.dtype, scalars[-1] is not None, bucket.stochastic, guard is not None)
        if param.numel() > 1 and key not in _UNCOMPILABLE:
            try:
                with _kernel_config():
                    _compiled_8bit(*key)(*tensors, *weights, *scalars, bucket.stochastic)
            except Exception as exc:
                if not _is_compiler_missing(exc):
                    raise
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                _warn_eager_fallback_once(device.type, param.dtype, reason)
                _UNCOMPILABLE.add(key)
                eager(*tensors, *weights, *scalars, bucket.stochastic)
        else:
            eager(*tensors, *weights, *scalars, bucket.stochastic)
        if guard is not None:
            if plan.on_device:
                guard_module.record_starts_on_device(guard.lags[i], bucket.grads[i], bucket.steps[i], plan.found_inf)
            else:
                plan.handed_back.append((b, i))


def _step_bucket(plan: StepPlan, bucket: Bucket) -> None:
    dtype, device = bucket.math_dtype, bucket.device
    scalars = _scalars(plan, bucket)
    # One vectorised evaluation of the coefficients for the whole bucket, on the device, no host sync; β̂2 = 1 − w2 is
    # formed in float64, then everything is rounded to the math dtype once.
    w1s, w2s = coefficients(torch.stack(bucket.steps).to(device), bucket.betas)
    coeffs = [c.to(dtype) for c in (w1s, 1 - w2s, w2s)]
    views: list[list[Tensor]] = [bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs]
    guard = bucket.guard
    per_tensor: list[list[Any]] = []
    table: Tensor | tuple[float, float] | None = None
    if guard is not None:
        found = guard.table()
        table = bucket.betas if found is None else found
        relatives, new_windows = zip(*(guard_module.relative_step_on_device(s.to(device)) for s in bucket.steps))
        if bucket.step_values is not None:  # on the host, the planner shifted the lags of a new window already
            new_windows = tuple(None for _ in new_windows)
        views.append(guard.lags)
        per_tensor = [list(relatives), list(new_windows)]
    _run(views, per_tensor, coeffs, scalars, bucket.stochastic, table)


def _run(views, per_tensor, coeffs, scalars, stochastic, table) -> None:
    """The kernel on every tensor of ``views`` (params, grads, exp_avgs, exp_avg_sqs[, lags]), CHUNK at a time; single
    elements and tensors that are not one dense block, eagerly."""
    compiled: list[list[Tensor]] = [[] for _ in views]
    compiled_idx: list[int] = []
    eager: list[int] = []
    for i in range(len(views[0])):
        tensors = [lst[i] for lst in views]
        numel = tensors[0].numel()
        # a complex param's real view goes eagerly: dynamo fails to trace views of a complex base after real ones
        complex_view = tensors[0]._base is not None and tensors[0]._base.is_complex()
        flat = dense_1d_views(tensors) if numel > 1 and not isinstance(table, tuple) and not complex_view else None
        if flat is not None:
            compiled_idx.append(i)
            for lst, t in zip(compiled, flat):
                lst.append(t)
        elif numel:  # 1 element (dynamo would specialise it) or not one dense block: the same function, eagerly
            eager.append(i)
    if compiled_idx:
        index = torch.tensor(compiled_idx, device=views[0][0].device)
        chunk_coeffs = [c.index_select(0, index) for c in coeffs]
        extra = [[lst[i] for i in compiled_idx] for lst in per_tensor]
        _run_compiled(compiled, extra, chunk_coeffs, scalars, stochastic, table)
    for i in eager:
        _eager(views, per_tensor, coeffs, scalars, stochastic, table, i)


def _run_compiled(chunks, per_tensor, coeffs, scalars, stochastic, table) -> None:
    """The compiled kernel over ``chunks`` = [params, grads, exp_avgs, exp_avg_sqs(, lags)] (1-D views), CHUNK at a
    time; if inductor cannot build it here, the rest eagerly, with one warning."""
    first = chunks[0][0]
    n = len(chunks[0])
    pad = (-n) % CHUNK
    if pad:
        dummies = _padding(first.device, tuple(lst[0].dtype for lst in chunks))
        chunks = [lst + dummy[:pad] for lst, dummy in zip(chunks, dummies)]
        coeffs = [torch.cat([c, c.new_zeros(pad)]) for c in coeffs]
        per_tensor = [lst + [lst[0]] * pad for lst in per_tensor]
    guarded = bool(per_tensor)
    key = (first.device.type, first.dtype, scalars[-1] is not None, stochastic, guarded)
    start = 0 if key in _UNCOMPILABLE else None
    if start is None:
        kernel = _compiled_chunk(*key)
        with _kernel_config():
            for c in range(0, n + pad, CHUNK):
                window = slice(c, c + CHUNK)
                extra = (chunks[4][window], per_tensor[0][window], per_tensor[1][window], table) if guarded else ()
                try:
                    kernel(*(lst[window] for lst in chunks[:4]), *(w[window] for w in coeffs), *scalars, *extra)
                except Exception as exc:
                    if not _is_compiler_missing(exc):
                        raise
                    # Raising now would leave the chunks before this one stepped: finish the step with the same
                    # function, eagerly, say so once, and not try again.
                    reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    _warn_eager_fallback_once(first.device.type, first.dtype, reason)
                    _UNCOMPILABLE.add(key)
                    start = c
                    break
    if start is not None:
        for i in range(start, n):
            _eager(chunks, per_tensor, coeffs, scalars, stochastic, table, i)


def _eager(views, per_tensor, coeffs, scalars, stochastic, table, i: int) -> None:
    """The kernel on tensor ``i`` of ``views``, uncompiled."""
    lr, weight_decay, eps, grad_factor, found_inf = scalars
    guarded = (views[4][i], per_tensor[0][i], per_tensor[1][i], table) if per_tensor else (None, None, None, None)
    _kernel(
        views[0][i], views[1][i], views[2][i], views[3][i], coeffs[0][i], coeffs[1][i], coeffs[2][i],
        lr, weight_decay, eps, grad_factor, found_inf, stochastic, *guarded,
    )  # fmt: skip
