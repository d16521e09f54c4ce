"""Build (once) and load the C++ kernel of the fused CPU step, ``csrc/fused_cpu.cpp``.

Why a hand-written kernel and not inductor on the CPU: calling one kernel once per step for all tensors (one parallel
region, no Python per tensor) is what makes it as fast as torch's fused AdamW; an inductor-compiled function pays
dynamo's guards on every call, which cost ~2× on models with many small tensors.

The source is compiled with the machine's C++ compiler against the headers and libraries of the installed torch
(no Python headers, no pybind11, no ninja): ~10 s the first time, then the shared library is loaded from a cache
keyed by the source, torch's version and the compiler flags, so a new torch or a changed kernel rebuilds and
nothing stale is ever loaded. Several processes building at once (DDP ranks) each write a private file and rename
it into place atomically.

A library is loaded only after its SHA-256 matches the checksum written beside it at build time: a truncated,
empty or overwritten file (a full disk, a killed copy) would otherwise crash the process inside the dynamic loader
(SIGBUS); it is rebuilt instead. A cache directory that cannot be written falls back, with one warning, to a
private directory of this user under the system's temporary directory. A machine without a compiler still loads
a valid cached library.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["cache_dir", "load"]

_SOURCE = Path(__file__).parent / "csrc" / "fused_cpu.cpp"


class CompilerNotFoundError(RuntimeError):
    """No C++ compiler on this machine: the fused CPU step cannot be built."""


def cache_dir() -> Path:
    """Where built kernels are kept: $ADAMNX_CACHE_DIR, else $XDG_CACHE_HOME/adamnx, else ~/.cache/adamnx."""
    if os.environ.get("ADAMNX_CACHE_DIR"):
        return Path(os.environ["ADAMNX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adamnx"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise CompilerNotFoundError(
        "fused=True on the CPU builds a small C++ kernel the first time it runs, and no C++ compiler was found "
        "(looked for $CXX, c++, g++, clang++). Install one (e.g. `apt install g++`), or use foreach=True or "
        "foreach=False, which need no compiler."
    )


def _isa_flags() -> list[str]:
    """Vector instructions the kernel may use: those torch itself dispatches to on this CPU (AVX2 or AVX-512).

    Not -march=native: a cache shared between machines (a home directory on NFS) must not hand a kernel built
    for one CPU to another; the flags are part of the cache key. ATEN_CPU_CAPABILITY=default (torch's own
    override) builds a portable kernel.
    """
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        return [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
    return avx2 if capability == "AVX2" else []


def _flags() -> list[str]:
    """Everything the compiler is told besides the source and the output file (and part of the cache key)."""
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [
        "-shared",
        "-fPIC",
        "-std=c++17",
        "-O3",
        "-fno-math-errno",  # lets sqrt vectorise; results are IEEE sqrt either way
        "-fno-trapping-math",  # lets branches over float compares vectorise (selects); no value changes
        "-ffp-contract=off",  # the kernel writes its fused multiply-adds itself: every walk rounds alike
        "-fopenmp",  # at::parallel_for is OpenMP inline code: torch's own OpenMP runtime runs it
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *_isa_flags(),
        *(arg for path in include_paths() for arg in ("-isystem", path)),
        f"-L{torch_lib}",
        f"-Wl,-rpath,{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
    ]


def _library_path(flags: list[str]) -> Path:
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    for part in (torch.__version__, str(torch.version.git_version), sys.platform, platform.machine(), *flags):
        key.update(part.encode() + b"\0")
    return cache_dir() / f"fused_cpu-{key.hexdigest()[:16]}.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _is_verified(library: Path) -> bool:
    """Whether ``library`` is complete: a non-empty file whose checksum file exists and matches its bytes."""
    try:
        return library.stat().st_size > 0 and _checksum_path(library).read_text().strip() == _digest(library)
    except OSError:  # either file missing, unreadable, or a directory
        return False


def _blocked(library: Path) -> bool:
    """Whether something other than a file (a directory, a socket) sits where the library or its checksum goes."""
    return any(path.exists() and not path.is_file() for path in (library, _checksum_path(library)))


def _damaged(library: Path, why: str) -> None:
    warnings.warn(f"adamnx's cached CPU kernel {library} {why}; building it again", stacklevel=5)


def _private_cache_dir() -> Path:
    """A directory only this user can write, under the system's temporary directory."""
    path = Path(tempfile.gettempdir()) / f"adamnx-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
        ours = not hasattr(os, "getuid") or info.st_uid == os.getuid()
        if ours and path.is_dir() and not path.is_symlink() and not info.st_mode & 0o022:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="adamnx-"))  # someone else's or unusable: a fresh one for this process


@functools.cache  # one warning per process and directory
def _writable_dir(preferred: Path) -> Path:
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=preferred, prefix=".write-test-"):
            pass  # a directory can exist and still refuse new files (read-only, another user's)
        return preferred
    except OSError as exc:
        fallback = _private_cache_dir()
        warnings.warn(
            f"adamnx cannot write its kernel cache {preferred} ({exc.strerror or exc}); building in {fallback} "
            "instead. Set ADAMNX_CACHE_DIR to a writable directory to keep the build between runs.",
            stacklevel=4,
        )
        return fallback


def _compile(compiler: str, flags: list[str], output: str) -> None:
    command = [compiler, str(_SOURCE), "-o", output, *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            "fused=True could not build its CPU kernel. The compiler said:\n"
            f"{result.stderr[-4000:]}\nCommand: {' '.join(command)}\n"
            "Use foreach=True or foreach=False meanwhile (no compiler needed), and please report this."
        )


def _publish(tmp: str, target: Path) -> None:
    """Move a built library into place with its checksum; readable by everyone (a shared cache), atomic."""
    os.chmod(tmp, 0o755)
    fd, tmp_sum = tempfile.mkstemp(prefix=target.name + "-", suffix=".sha256.tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(_digest(Path(tmp)) + "\n")
    os.chmod(tmp_sum, 0o644)
    # The checksum first: a reader in between sees a new checksum beside the old library, refuses it, rebuilds.
    os.replace(tmp_sum, _checksum_path(target))
    os.replace(tmp, target)


def _build(compiler: str | None = None) -> Path:
    """The path of a verified library: the cached one, else a new build (in a writable cache directory)."""
    flags = _flags()
    target = _library_path(flags)
    if _is_verified(target):
        return target  # no compiler needed
    target = _writable_dir(target.parent) / target.name
    if _is_verified(target):  # the fallback directory may already hold one
        return target
    if _blocked(target):  # cannot be replaced: build beside it, in this user's private directory
        fallback = _private_cache_dir() / target.name
        _damaged(target, f"is not a file (or its checksum is not): using {fallback} instead")
        target = fallback
        if _is_verified(target):
            return target
    elif target.exists():
        _damaged(target, "does not match its checksum (truncated, empty or overwritten)")
    compiler = compiler or _compiler()
    # The first fused step waits for this (~10 s): say so, in one line, rather than seem to hang.
    print(
        f"adamnx: building the fused CPU kernel in {target.parent} (once per machine and torch version)",
        file=sys.stderr,
    )
    fd, tmp = tempfile.mkstemp(prefix=target.stem + "-", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        _compile(compiler, flags, tmp)
        _publish(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load():
    """The ``torch.ops.adamnx`` namespace with the CPU kernels, building them on first use."""
    library = _build()
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:  # verified yet not loadable (another machine's build, a damaged disk): build a fresh one
        fresh = Path(tempfile.mkdtemp(prefix="adamnx-")) / library.name
        warnings.warn(
            f"adamnx could not load its cached CPU kernel {library} ({exc}); building it in {fresh}", stacklevel=2
        )
        _compile(_compiler(), _flags(), str(fresh))
        torch.ops.load_library(str(fresh))
    return torch.ops.adamnx
