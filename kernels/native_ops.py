"""The dispatcher's CPU kernels for the hot ops (``native_ops.cpp``): a compiled graph's call of
``quantized_linear``, ``hadamard_transform``, ``kv_quantize``, ``packed_attention``,
``int8_weight_linear`` or ``int8_dynamic_linear`` reaches the C kernels without entering Python. A
decode step's one-row GEMVs (the int4 layers and the 8-bit head) and its attention heads run on
torch's threads (its warm pool: no thread start per call),
each output channel or head computed as one call would, so the same bits. Binding also hands
``native.c`` a runner for its own threaded kernels (a prefill's int4 GEMM and Hadamard rows, the
8-bit head from Python): their jobs run on that pool too instead of on threads they start, which
shared the two cores with the pool's threads still spinning after Inductor's loops (AVX2 EPYC,
a 2048-token prefill of SmolLM2: its Hadamards 0.56 → 0.17 s).

Why: a decode step of a 30-layer model calls these ops about 300 times with one row each;
through their Python bodies each call costs tens of microseconds of dispatch, checks and
ctypes, more than its kernel (``benchmarks/speed.py``'s overhead column). The C++ kernel runs
the same C function of the same library (``native.library()``, whose addresses ``load`` hands
over) on the same buffers, so the same bits, and sends every case it does not cover to the op's
Python body (``quarot_fx::_<op>_python``). The Python bodies keep deciding: the first time a
linear's shape runs the int4 GEMV, or a Hadamard order runs the C stages, they hand that
decision over (``allow_gemv``, ``add_plan``) and later calls of the shape stay in C++.

Built once per machine and torch version with the system C++ compiler against torch's headers
(about 10 s), into the same private cache directory as ``native.c``'s libraries; loaded when a
graph is lowered (``load``). ``QUAROT_FX_NATIVE_OPS=0`` keeps every call in Python. Without a
C++ compiler or the C library, ``load`` returns False and says why (``unavailable_reason``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("native_ops.cpp")
ENVIRONMENT = "QUAROT_FX_NATIVE_OPS"
# the order _native_bind takes them in
BOUND_KERNELS = ("int4_gemv", "hadamard_rows", "kv_quantize", "packed_attention", "int8_weight_linear",
                 "int8_codes_linear")
_reason: list[str] = []
_allowed: set = set()  # gemv shapes and Hadamard plans already handed over
_bound: list = []  # the C library the kernels call (native.library() when load ran)
_suspensions = [0]  # open ``suspended()`` blocks: no binding while there is one


def _command(compiler: str, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [flag for path in cpp_extension.include_paths() for flag in ("-I", path)]
    libraries = [flag for path in cpp_extension.library_paths() for flag in ("-L", path, f"-Wl,-rpath,{path}")]
    # -fopenmp: at::parallel_for (inline in the headers) runs on torch's OpenMP threads, not serially;
    # the rpath finds torch's own libgomp first, and the loader shares the copy torch already loaded
    return [compiler, "-O2", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes, str(SOURCE),
            "-o", str(out), *libraries, "-lc10", "-ltorch_cpu", "-ltorch"]


def _library_path() -> Path:
    """The built library (built now if absent or not private), keyed by the source, torch, the
    compiler and its flags."""
    compiler = os.environ.get("CXX", "c++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, torch.__file__, compiler, version,
                                    sys.version, *_command(compiler, Path("out"))]).encode()).hexdigest()[:16]
    target = native._cache_dir() / f"native_ops-{key}.so"
    if not native._private(target, stat.S_IFREG):
        native.build_library(lambda out: _command(compiler, out), target)
    return target


@lru_cache(maxsize=None)
def load() -> bool:
    """Build (once per machine) and load the kernels, and bind them to the C library in use.
    False, with the reason in ``unavailable_reason()``, where they cannot run: the calls then
    stay in the ops' Python bodies, which compute the same bits."""
    if os.environ.get(ENVIRONMENT, "1") == "0":
        _reason.append(f"{ENVIRONMENT}=0 keeps every call in Python")
        return False
    lib = native.library()
    if lib is None:
        _reason.append(f"no C kernels to call: {native.unavailable_reason()}")
        return False
    try:
        torch.ops.load_library(str(_library_path()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        _reason.append(f"the dispatcher kernels (native_ops.cpp) did not build or load: {detail.strip()[:300]}")
        return False
    _bound[:] = [lib]
    if not _suspensions[0]:
        _bind(lib)
    return True


def _bind(lib) -> None:
    addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in BOUND_KERNELS]
    torch.ops.quarot_fx._native_bind(addresses, native.FEW_ROWS)
    # the C kernels' own threads (prefill's GEMMs and Hadamards) now run on torch's OpenMP pool
    lib.set_job_runner(torch.ops.quarot_fx._native_pool_runner())


@contextmanager
def suspended():
    """Every call in the block runs the ops' Python bodies: for tests that watch or swap the C
    functions those bodies call (``native.library`` of another instruction-set variant). A
    ``load`` inside the block binds at its end."""
    _suspensions[0] += 1
    if loaded():
        torch.ops.quarot_fx._native_unbind()
        _allowed.difference_update({key for key in _allowed if key[0] == "gemv"})  # unbinding dropped them
    try:
        yield
    finally:
        _suspensions[0] -= 1
        if not _suspensions[0] and loaded():
            _bind(_bound[0])


def loaded() -> bool:
    """The kernels are bound (``load`` ran and succeeded); never builds."""
    return load.cache_info().currsize > 0 and load()


def unavailable_reason() -> str | None:
    return _reason[-1] if _reason and not loaded() else None


def allow_gemv(rows: int, in_features: int, out_features: int, gemm: str) -> None:
    """Hand over: the int4 GEMV runs this linear shape under this ``gemm`` policy (the Python
    body chose it: ``int_gemm.decide``)."""
    key = ("gemv", rows, in_features, out_features, gemm)
    if key not in _allowed and loaded():
        torch.ops.quarot_fx._native_allow_gemv(rows, in_features, out_features, gemm)
        _allowed.add(key)


def add_plan(n: int, inner: int, orders: tuple, matrices: tuple, scale: float, many_rows: bool) -> None:
    """Hand over the C stages' plan of the Hadamard transform of width ``n`` (``native.hadamard_rows``'s
    arguments); ``many_rows``: for more than ``native.FEW_ROWS`` rows too."""
    key = ("hadamard", n, inner)
    if key not in _allowed and loaded():
        torch.ops.quarot_fx._native_plan(n, inner, list(orders), list(matrices), scale, many_rows)
        _allowed.add(key)


def forget() -> None:
    """Drop the handed-over GEMM decisions (with ``int_gemm.forget``)."""
    if loaded():
        torch.ops.quarot_fx._native_forget_gemv()
    _allowed.difference_update({key for key in _allowed if key[0] == "gemv"})


def kernel_ns() -> int:
    """Nanoseconds spent so far inside the C kernels called from C++ (``native.timed`` adds them)."""
    return int(torch.ops.quarot_fx._native_kernel_ns()) if loaded() else 0


native.CLOCKS.append(kernel_ns)
