"""The fused CPU kernel (backends/csrc/fused_cpu.cpp): every dtype pair, thread splits, stochastic rounding, layouts
it cannot walk in place, and its build (cache, missing or failing compiler)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adamnx import AdamNX
from adamnx.backends import _cpu_extension
from helpers import rel_err


def _run(params0, grads_seq, **kwargs):
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = AdamNX(params, **kwargs)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _sequence(shapes, n_steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=g) * 10 ** (t % 3 - 1)).to(dtype) for s in shapes] for t in range(n_steps)]
    return params0, grads


# Sizes around the kernel's split points: tiny, one under/over its 16,384-element grain, several grains.
SIZES = [(1,), (3, 5), (16383,), (16385,), (300, 170), (7, 1, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_for_loop_across_thread_splits(dtype):
    params0, grads = _sequence(SIZES, 60, dtype)
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    fused, fused_opt = _run(params0, grads, fused=True, **kwargs)
    loop, loop_opt = _run(params0, grads, foreach=False, **kwargs)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for a, b in zip(fused, loop):
        assert rel_err(a, b.detach().double().numpy()) <= tol
        for key in ("exp_avg", "exp_avg_sq"):
            assert rel_err(fused_opt.state[a][key], loop_opt.state[b][key].double().numpy()) <= tol
        assert fused_opt.state[a]["step"].item() == 60


def test_result_does_not_depend_on_the_thread_count():
    params0, grads = _sequence(SIZES, 5, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run(params0, grads, fused=True)
        torch.set_num_threads(max(2, threads))
        many, _ = _run(params0, grads, fused=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_low_precision_params_with_either_state_use_float32_math(dtype, state_dtype):
    """bf16/fp16 params, moments in their own dtype or in float32: the float32 step, each result rounded once."""
    params0, grads = _sequence(SIZES[:4], 1, dtype)
    fused, fused_opt = _run(params0, grads, fused=True, state_dtype=state_dtype)
    upcast = [[g.float() for g in step] for step in grads]
    exact, exact_opt = _run([p.float() for p in params0], upcast, foreach=False)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10  # one rounding, relative
    for a, b in zip(fused, exact):
        state_type = state_dtype or dtype
        assert a.dtype == dtype and fused_opt.state[a]["exp_avg"].dtype == state_type
        torch.testing.assert_close(a.float(), b.detach().to(dtype).float(), rtol=ulp, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            expected = exact_opt.state[b][key].to(state_type).float()
            torch.testing.assert_close(fused_opt.state[a][key].float(), expected, rtol=ulp, atol=1e-7)


def test_stochastic_rounding_is_seeded_by_the_step_and_picks_neighbours():
    """The rounding noise comes from a generator seeded by the step itself: the same whatever torch.manual_seed says
    (data-parallel replicas seeded apart round alike), and torch's own random stream is left where it was."""
    p0 = torch.full((50_000,), 1.0 + 2.0**-10).bfloat16()  # bf16 1.0

    def one_step(seed):
        torch.manual_seed(seed)
        p = torch.nn.Parameter(p0.clone())
        opt = AdamNX(
            [p], lr=2.0**-10, weight_decay=0.0, state_dtype=torch.float32, stochastic_rounding=True, fused=True
        )
        p.grad = -torch.ones_like(p)  # first step: update +lr·sign = +2^-10, a quarter of bf16's ulp at 1
        opt.step()
        return p.detach().float(), torch.rand(3)

    (a, after_a), (b, _) = one_step(0), one_step(1)
    assert torch.equal(a, b)  # torch's seed does not matter
    torch.manual_seed(0)
    assert torch.equal(after_a, torch.rand(3))  # the step drew nothing from torch's stream
    assert set(a.unique().tolist()) == {1.0, 1.0 + 2.0**-7}  # only the two bf16 neighbours
    assert a.mean().item() == pytest.approx(1.0 + 2.0**-10, abs=2e-5)  # unbiased


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("released", [False, True], ids=["two-groups", "released"])
def test_params_alike_in_two_groups_or_stepped_alone_round_apart(released, fused):
    """Two params of the same shape, values and gradients, in two param groups (or stepped one by one by gradient
    release): the step's seed mixes in where they are, so they draw other numbers (they drew the same: rounding
    errors correlated across layers). Each is still rounded to its two neighbours."""
    from adamnx import release_gradients

    p0 = torch.full((50_000,), 1.0 + 2.0**-10).bfloat16()
    params = [torch.nn.Parameter(p0.clone()) for _ in range(2)]
    options = {"lr": 2.0**-10, "weight_decay": 0.0, "stochastic_rounding": True, "fused": fused, "foreach": not fused}
    if released:
        opt = AdamNX(params, state_dtype=torch.float32, **options)
        with release_gradients(opt):
            sum(-p.float().sum() for p in params).backward()  # steps each param alone
    else:
        opt = AdamNX([{"params": [p]} for p in params], state_dtype=torch.float32, **options)
        for p in params:
            p.grad = -torch.ones_like(p)
        opt.step()
    a, b = (p.detach().float() for p in params)
    assert not torch.equal(a, b)
    for t in (a, b):
        assert set(t.unique().tolist()) == {1.0, 1.0 + 2.0**-7}


def test_layouts_the_kernel_cannot_walk_give_the_bits_of_contiguous_tensors():
    """A grad whose memory order differs from its param's (channels_last vs contiguous): the kernel steps contiguous
    copies, so the result is bitwise what contiguous tensors give."""
    torch.manual_seed(0)
    p0 = torch.randn(2, 3, 4, 5)
    grads = [[torch.randn(2, 3, 4, 5)] for _ in range(10)]
    contiguous, _ = _run([p0], grads, fused=True)
    mixed, _ = _run([p0], [[g.to(memory_format=torch.channels_last)] for (g,) in grads], fused=True)
    assert torch.equal(mixed[0], contiguous[0])
    loop, _ = _run([p0], grads, foreach=False)
    assert rel_err(mixed[0], loop[0].detach().double().numpy()) <= 1e-6


def test_kernel_checks_its_arguments():
    ops = _cpu_extension.load()
    p = torch.zeros(3)
    w = torch.zeros(1, dtype=torch.float64)
    none = torch.empty(0)

    def call(lists=([p], [p], [p], [p]), lags=(), w1=w, relative=none, table=none, broken=none):
        return ops.fused_step_(*lists, list(lags), w1, w, relative, table, broken, 1e-3, 0.0, 1e-8, 1.0, False, 0)

    with pytest.raises(RuntimeError, match="same length"):
        call(lists=([p], [p, p], [p], [p]))
    with pytest.raises(RuntimeError, match="float64"):
        call(w1=w.float())
    lag = torch.zeros(3, dtype=torch.int32)
    one = torch.zeros(1, dtype=torch.int64)
    flag = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="one tensor per param"):
        call(lags=[lag, lag], relative=one, table=torch.zeros(3, 4), broken=flag)
    for relative in (none, torch.zeros(2, dtype=torch.int64), torch.zeros(1)):
        with pytest.raises(RuntimeError, match="relative_steps"):  # one int64 per param
            call(lags=[lag], relative=relative, table=torch.zeros(3, 4), broken=flag)
    for broken in (none, torch.zeros(2, dtype=torch.int32), torch.zeros(1)):
        with pytest.raises(RuntimeError, match="broken"):  # one int32 flag per param
            call(lags=[lag], relative=one, table=torch.zeros(3, 4), broken=broken)
    for table in (none, torch.zeros(3, 4, dtype=torch.float64), torch.zeros(2, 4), torch.zeros(4, 3).t()):
        with pytest.raises(RuntimeError, match="count table"):  # float32 params: a contiguous float32 (3, L)
            call(lags=[lag], relative=one, table=table, broken=flag)
    # lags it cannot read (another dtype, another shape): the tensor is left to the caller, untouched
    for bad in (lag.long(), torch.zeros(2, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int32)):
        before = p.clone()
        assert call(lags=[bad], relative=one, table=torch.zeros(3, 4), broken=flag) == [0]
        assert torch.equal(p, before)


# --------------------------------------------------------------------------- the build


def test_build_is_cached_by_source_torch_version_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    first = _cpu_extension._build(_cpu_extension._compiler())
    assert first.parent == tmp_path and first.suffix == ".so"
    # the library and its checksum, no temporary files left behind; readable by everyone sharing the cache
    assert sorted(f.name for f in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]
    assert first.stat().st_mode & 0o777 == 0o755

    def no_compiling(*args, **kwargs):
        raise AssertionError("a cached kernel was rebuilt")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert _cpu_extension._build(_cpu_extension._compiler()) == first
    monkeypatch.setattr(_cpu_extension, "_isa_flags", lambda: ["-DDIFFERENT_FLAGS"])
    with pytest.raises(AssertionError, match="rebuilt"):  # other flags: another key, so a new build
        _cpu_extension._build(_cpu_extension._compiler())


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(_cpu_extension.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler was found.*foreach=True"):
        _cpu_extension._compiler()


def test_failing_compiler_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)could not build its CPU kernel.*foreach=True"):
        _cpu_extension._build("false")  # a "compiler" that always fails
    assert list(tmp_path.iterdir()) == []


def test_an_optimizer_step_surfaces_a_build_failure(monkeypatch):
    def fail():
        raise _cpu_extension.CompilerNotFoundError("no C++ compiler was found")

    monkeypatch.setattr(_cpu_extension, "load", fail)
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamNX([p], fused=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state  # failed before any state was created


def test_params_with_different_step_counts_get_their_own_coefficients():
    """A param without a gradient on some steps counts fewer steps: per-tensor coefficients for the group."""
    shapes = [(40, 3), (17,), (6, 6)]
    params0, grads = _sequence(shapes, 30, torch.float64)
    for t, step_grads in enumerate(grads):
        if t % 4 == 1:
            step_grads[1] = None

    def run(**kwargs):
        params = [p.clone().requires_grad_(True) for p in params0]
        opt = AdamNX(params, lr=1e-2, **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.clone()
            opt.step()
        return params, opt

    fused, fused_opt = run(fused=True)
    loop, _ = run(foreach=False)
    assert fused_opt.state[fused[1]]["step"].item() == 22 and fused_opt.state[fused[0]]["step"].item() == 30
    for a, b in zip(fused, loop):
        assert rel_err(a, b.detach().numpy()) <= 1e-13


@pytest.mark.parametrize(
    ("capability", "expected"),
    [("DEFAULT", []), ("AVX2", ["-mavx2"]), ("AVX512", ["-mavx2", "-mavx512f"])],
)
def test_vector_flags_follow_torchs_cpu_capability(capability, expected, monkeypatch):
    monkeypatch.setattr(_cpu_extension.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    flags = _cpu_extension._isa_flags()
    assert all(f in flags for f in expected) and (flags == [] or capability != "DEFAULT")


# --------------------------------------------------------------------------- a cache that cannot take a process down


def _good_library() -> bytes:
    """The bytes of a correctly built kernel (the one this process loaded)."""
    return _cpu_extension._build().read_bytes()


def _fake_compiler(monkeypatch, calls: list):
    """Builds by copying a good library: a rebuild takes milliseconds and is counted."""
    good = _good_library()

    def compile_(compiler, flags, output):
        calls.append(output)
        with open(output, "wb") as f:
            f.write(good)

    monkeypatch.setattr(_cpu_extension, "_compile", compile_)
    monkeypatch.setattr(_cpu_extension, "_compiler", lambda: "c++")
    return good


CORRUPTIONS = {
    "truncated": lambda good: good[: len(good) // 3],
    "empty": lambda good: b"",
    "garbage": lambda good: bytes(range(256)) * 64,
    "same-size-flipped": lambda good: good[:-100] + bytes(100),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_cached_library_is_rebuilt_not_loaded(corruption, tmp_path, monkeypatch):
    calls: list = []
    good = _fake_compiler(monkeypatch, calls)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    target = _cpu_extension._build()  # a valid library and its checksum
    assert calls and target.read_bytes() == good
    target.write_bytes(CORRUPTIONS[corruption](good))  # the checksum beside it still names the good bytes
    calls.clear()
    with pytest.warns(UserWarning, match="does not match its checksum") as record:
        assert _cpu_extension._build() == target and len(calls) == 1  # refused, rebuilt
    assert len(record) == 1
    assert target.read_bytes() == good and _cpu_extension._is_verified(target)


def test_a_cached_library_without_a_checksum_is_rebuilt(tmp_path, monkeypatch):
    """A cache written before checksums existed (or whose checksum write was lost) is not trusted."""
    calls: list = []
    good = _fake_compiler(monkeypatch, calls)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    target = _cpu_extension._library_path(_cpu_extension._flags())
    target.write_bytes(good[:100])
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert _cpu_extension._build() == target and len(calls) == 1 and target.read_bytes() == good


def test_a_machine_without_a_compiler_uses_a_valid_cached_kernel(tmp_path, monkeypatch):
    calls: list = []
    _fake_compiler(monkeypatch, calls)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    target = _cpu_extension._build()

    def no_compiler():
        raise _cpu_extension.CompilerNotFoundError("no C++ compiler was found")

    monkeypatch.setattr(_cpu_extension, "_compiler", no_compiler)
    assert _cpu_extension._build() == target  # loaded from the cache, no compiler asked for
    target.write_bytes(b"")
    with pytest.raises(_cpu_extension.CompilerNotFoundError), pytest.warns(UserWarning, match="building it again"):
        _cpu_extension._build()  # a broken cache and no compiler: a clear error


def test_an_unwritable_cache_directory_falls_back_with_one_warning(tmp_path, monkeypatch):
    calls: list = []
    good = _fake_compiler(monkeypatch, calls)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # nothing can be created below it, not even by root
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(blocked / "cache"))
    private = tmp_path / "private"
    monkeypatch.setattr(_cpu_extension, "_private_cache_dir", lambda: private.mkdir(exist_ok=True) or private)
    with pytest.warns(UserWarning, match="ADAMNX_CACHE_DIR") as record:
        target = _cpu_extension._build()
    assert len(record) == 1 and target.parent == private and target.read_bytes() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _cpu_extension._build() == target  # a valid build there: found again, no warning, no rebuild
    assert len(calls) == 1


def test_the_private_fallback_directory_belongs_to_this_user_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpu_extension.tempfile, "gettempdir", lambda: str(tmp_path))
    first = _cpu_extension._private_cache_dir()
    assert first.parent == tmp_path and first.stat().st_mode & 0o777 == 0o700
    assert _cpu_extension._private_cache_dir() == first  # kept between processes of this user
    first.chmod(0o777)  # someone could plant a library there: not used
    assert _cpu_extension._private_cache_dir() != first


def test_a_read_only_cache_directory_warns_and_builds_elsewhere(tmp_path, monkeypatch):
    """A permission error on the cache (simulated: the tests run as root, whom file modes do not stop)."""
    calls: list = []
    _fake_compiler(monkeypatch, calls)
    read_only = tmp_path / "shared-cache"
    read_only.mkdir()
    real = _cpu_extension.tempfile.NamedTemporaryFile

    def refuse_in_read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == read_only:
            raise PermissionError(13, "Permission denied", str(read_only))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(_cpu_extension.tempfile, "NamedTemporaryFile", refuse_in_read_only)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(read_only))
    monkeypatch.setattr(_cpu_extension.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.warns(UserWarning, match=r"Permission denied.*ADAMNX_CACHE_DIR"):
        target = _cpu_extension._build()
    assert target.parent == tmp_path / f"adamnx-{os.getuid()}" and list(read_only.iterdir()) == []


@pytest.mark.slow
def test_two_processes_repair_a_truncated_cache_at_once(tmp_path):
    """Two fresh processes (DDP ranks) meet a truncated library: neither crashes, both rebuild, one file is left."""
    target_name = _cpu_extension._library_path(_cpu_extension._flags()).name
    (tmp_path / target_name).write_bytes(_good_library()[:4096])  # would be SIGBUS inside dlopen
    script = (
        "import torch; from adamnx import AdamNX\n"
        "p = torch.nn.Parameter(torch.ones(5)); opt = AdamNX([p], fused=True)\n"
        "p.grad = torch.ones(5); opt.step(); print(p.detach().sum().item())\n"
    )
    env = {**os.environ, "ADAMNX_CACHE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()[-2000:]
        assert float(out) == pytest.approx(5 * (1 - 1e-3 * 0.01) - 5e-3, rel=1e-6)
    assert sorted(f.name for f in tmp_path.iterdir()) == [target_name, target_name + ".sha256"]
    assert _cpu_extension._is_verified(tmp_path / target_name)


def test_an_empty_library_whose_checksum_matches_is_rebuilt_with_one_warning(tmp_path, monkeypatch):
    """An empty file with the checksum of empty bytes beside it (a cache copied while still being written): the
    loader would fail on it; it is rebuilt, with one warning."""
    calls: list = []
    good = _fake_compiler(monkeypatch, calls)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    target = _cpu_extension._library_path(_cpu_extension._flags())
    target.write_bytes(b"")
    _cpu_extension._checksum_path(target).write_text(hashlib.sha256(b"").hexdigest() + "\n")
    with pytest.warns(UserWarning, match="does not match its checksum") as record:
        assert _cpu_extension._build() == target
    assert len(record) == 1 and len(calls) == 1 and target.read_bytes() == good


@pytest.mark.parametrize("where", ["library", "checksum"])
def test_a_directory_where_the_library_goes_is_bypassed_with_one_warning(where, tmp_path, monkeypatch):
    calls: list = []
    good = _fake_compiler(monkeypatch, calls)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path / "cache"))
    private = tmp_path / "private"
    monkeypatch.setattr(_cpu_extension, "_private_cache_dir", lambda: private.mkdir(exist_ok=True) or private)
    target = _cpu_extension._library_path(_cpu_extension._flags())
    target.parent.mkdir(parents=True)
    (target if where == "library" else _cpu_extension._checksum_path(target)).mkdir()
    with pytest.warns(UserWarning, match="is not a file") as record:
        built = _cpu_extension._build()
    assert len(record) == 1 and built == private / target.name and built.read_bytes() == good
    assert _cpu_extension._is_verified(built) and len(calls) == 1


_REFUSED_ONCE = """
import shutil, warnings, torch
from adamnx.backends import _cpu_extension
good = _cpu_extension._build()
_cpu_extension._compile = lambda compiler, flags, output: shutil.copyfile(good, output)  # a build, in milliseconds
real_load, refused = torch.ops.load_library, []
def refuse_once(path):
    if not refused:
        refused.append(path)
        raise OSError("invalid ELF header")
    return real_load(path)
torch.ops.load_library = refuse_once
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    ops = _cpu_extension.load()
assert refused and hasattr(ops, "fused_step_"), refused
print(len(record), record[0].message)
"""


def test_a_verified_library_that_does_not_load_is_built_afresh():
    """A library that passes its checksum but that the dynamic loader refuses (another machine's build): a fresh
    build, with one warning. In a process of its own: a process loads the kernel once."""
    result = subprocess.run([sys.executable, "-c", _REFUSED_ONCE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("1 adamnx could not load its cached CPU kernel"), result.stdout


def test_a_build_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """The first fused step builds the kernel (~10 s): one line on stderr says why it waits; a cached one says nothing."""
    calls: list = []
    _fake_compiler(monkeypatch, calls)
    monkeypatch.setenv("ADAMNX_CACHE_DIR", str(tmp_path))
    capsys.readouterr()
    _cpu_extension._build()
    first = capsys.readouterr().err.splitlines()
    _cpu_extension._build()
    assert first == [f"adamnx: building the fused CPU kernel in {tmp_path} (once per machine and torch version)"]
    assert capsys.readouterr().err == ""


def test_advance_steps_advances_every_counter_in_one_call():
    ops = _cpu_extension.load()
    steps = [torch.tensor(3.0, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float32)]
    out = torch.empty(2, dtype=torch.float64)
    ops.advance_steps_(steps, 1.0, out)
    assert out.tolist() == [4.0, 8.0] and steps[0].item() == 4.0 and steps[1].item() == 8.0
    with pytest.raises(RuntimeError, match="1-element float32 or float64"):  # checked before any counter moves
        ops.advance_steps_([steps[0], torch.tensor(1, dtype=torch.int64)], 1.0, out)
    assert steps[0].item() == 4.0


def test_a_dtype_pair_without_a_kernel_in_an_awkward_layout_goes_eagerly():
    """fp16 params with bf16 moments have no kernel: refused by the kernel twice (in place, then as contiguous
    copies) they are stepped in torch ops, like the for-loop's."""
    torch.manual_seed(0)
    p0 = torch.randn(4, 6).half()
    grads = [[torch.randn(6, 4).half().t()] for _ in range(5)]  # the grad in another memory order
    fused, _ = _run([p0], grads, fused=True, state_dtype=torch.bfloat16)
    loop, _ = _run([p0], grads, foreach=False, state_dtype=torch.bfloat16)
    torch.testing.assert_close(fused[0], loop[0], rtol=2e-3, atol=1e-3)
