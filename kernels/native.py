"""quarot-fx's C kernels (``native.c``), built with the system C compiler once per machine.

Why C: at decode a linear is a GEMV that reads each weight once, so its speed is the bytes it
reads. No torch op runs an exact int4 × int8 GEMV fast on an AVX2 CPU (``_int_mm``,
``_weight_int8pack_mm`` and Inductor's generated loop over the packed bytes all measured slower
than the fp32 matmul), while AVX2's byte multiply-add reads the packed weight directly. The KV
cache's dequantization, run over the whole cache every decode step, is one pass in C instead of
the reference's several, and quantizing one decode token per head is one call instead of a
dozen small torch ops; so is a decode token's online Hadamard (butterflies, no stage GEMMs too
small to pay for their calls), and the 8-bit output head's GEMV (a quarter of the float32 head's
bytes, ``int8_linear.py``). At prefill, the same byte multiply-add in a register- and cache-blocked GEMM
(``int4_gemm``) does twice the fp32 FMA's work per instruction, exactly, where ``_int_mm`` has no
fast kernel for this CPU.

One source, built once per instruction-set variant (``VARIANTS``: AVX512-BF16, AVX512-VNNI, AVX2,
generic C), each with its own flags rather than ``-march=native``; at load the best variant whose
features the CPU reports (and the compiler builds) is used, or the one ``$QUAROT_FX_ISA`` names.
Every variant computes the same bits (integer sums are exact; float sums run in one fixed order),
which ``tests/test_native_isa.py`` checks for each variant this CPU can run. One exception, in
the opt-in ``prefill_attention="int8"`` kernel only: the AVX512 builds' softmax sums its 16 lanes
in another order than AVX2's 8 (its P·V sums of 8-bit weight codes are exact integers in every
build), so those variants agree with the others to float rounding. ``variant()`` names the
one in use (``speed.py`` and the GEMM report print it). The libraries live in a directory only this user can write
(``$QUAROT_FX_CACHE`` or ``~/.cache/quarot_fx``, see ``_cache_dir``; a library file another user
could have written is rebuilt, never loaded), and loaded with ctypes, which releases the GIL during the call. Without a
compiler the kernels are simply unavailable (``unavailable_reason()``): ``int_gemm`` never picks
them, and the KV ops and Hadamards run their torch code.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import subprocess
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from .common import cpu_description
from .gemm import register_gemm

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")  # no fused multiply-add: the same bits
# Best first: (name, compiler flags, the /proc/cpuinfo flags the CPU must report).
_VNNI_FLAGS = ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
_VNNI_NEEDS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
VARIANTS = (
    ("avx512bf16", (*_VNNI_FLAGS, "-mavx512bf16"), _VNNI_NEEDS | {"avx512_bf16"}),
    ("avx512vnni", _VNNI_FLAGS, _VNNI_NEEDS),
    ("avx2", ("-mavx2", "-mfma"), {"avx2", "fma"}),
    ("generic", (), set()),
)
ISA_ENVIRONMENT = "QUAROT_FX_ISA"
FEW_ROWS = 16  # a decode step's rows (or a small batch): where the C kernels take over from torch's calls;
# the GEMV's limit (native.c MAX_ROWS) and packed attention's too
_reason: list[str] = []


def _cpu_identity() -> str:
    return "\n".join(cpu_description()) or "unknown cpu"


def _private(path: Path, kind: int) -> bool:
    """``path`` (not followed if a link) is a ``kind`` (stat.S_IFDIR/S_IFREG) this user owns and
    nobody else may write: only then is a library in it safe to load."""
    try:
        info = path.lstat()
    except OSError:
        return False
    uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
    return stat.S_IFMT(info.st_mode) == kind and info.st_uid == uid and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _cache_dir() -> Path:
    """A directory for the built library that only this user can write: ``$QUAROT_FX_CACHE``, else
    ``~/.cache/quarot_fx``, else ``<tmp>/quarot_fx-<uid>`` (each created 0700, then checked: owner
    and no group/other write); else a fresh private temporary directory (rebuilt per process).
    Never a shared, predictable path another local user could plant a library in."""
    if "QUAROT_FX_CACHE" in os.environ:
        candidates = [Path(os.environ["QUAROT_FX_CACHE"])]
    else:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        candidates = [Path.home() / ".cache" / "quarot_fx", Path(tempfile.gettempdir()) / f"quarot_fx-{uid}"]
    for directory in candidates:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if _private(directory, stat.S_IFDIR) and os.access(directory, os.W_OK):
            return directory
    return Path(tempfile.mkdtemp(prefix="quarot_fx-"))


def build_library(command, target: Path) -> None:
    """Run ``command(output_path)`` (a compiler command line writing a shared library there) in a
    scratch directory beside ``target``, then move the library into place: atomic, so concurrent
    builders all end with a whole file, and 0700, so ``_private`` accepts it."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(command(built), capture_output=True, text=True, check=True)
        os.chmod(built, 0o700)
        built.replace(target)


def _build(compiler: str, flags: tuple, target: Path) -> None:
    build_library(lambda out: [compiler, *FLAGS, *flags, str(SOURCE), "-o", str(out), "-lm"], target)


def cpu_supports(name: str) -> bool:
    """The CPU reports every feature variant ``name`` needs."""
    flags = {flag for line in _cpu_identity().splitlines() if line.startswith("flags") for flag in line.split()}
    return next(needs for variant, _, needs in VARIANTS if variant == name) <= flags


def _requested() -> str | None:
    name = os.environ.get(ISA_ENVIRONMENT) or None
    if name is not None and name not in [v for v, _, _ in VARIANTS]:
        raise ValueError(f"the environment variable {ISA_ENVIRONMENT}={name!r} is not a kernel variant; set it to one "
                         f"of {', '.join(v for v, _, _ in VARIANTS)} or unset it")
    if name is not None and not cpu_supports(name):
        raise ValueError(f"{ISA_ENVIRONMENT}={name!r}: this CPU lacks the features that variant needs")
    return name


@lru_cache(maxsize=None)
def load_variant(name: str):
    """The library built for variant ``name`` (None if this CPU cannot run it or it does not
    build; the reason in ``unavailable_reason()``)."""
    if not cpu_supports(name):
        _reason.append(f"this CPU lacks the features of the {name} kernels")
        return None
    flags = next(f for variant, f, _ in VARIANTS if variant == name)
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, *flags, _cpu_identity()])
                             .encode()).hexdigest()[:16]
        target = _cache_dir() / f"native-{name}-{key}.so"
        if not _private(target, stat.S_IFREG):  # absent, or writable by others (or not ours): never loaded
            _build(compiler, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        _reason.append(f"the {name} C kernels did not build with {compiler!r}: {detail.strip()[:300]}")
        return None
    lib.isa_variant.restype = ctypes.c_char_p
    lib.int4_gemv.restype = lib.kv_dequantize.restype = lib.int8_weight_linear.restype = None
    lib.kv_quantize.restype = ctypes.c_int
    lib.int4_gemv.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
    lib.int4_gemm.restype = lib.gemm_available.restype = ctypes.c_int
    lib.int4_gemm.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
    lib.int32_epilogue.restype = ctypes.c_int
    lib.int32_epilogue.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.int8_weight_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
    lib.int8_codes_linear.restype = None
    lib.int8_codes_linear.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
    lib.kv_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    lib.kv_quantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_int64] * 2
    lib.packed_attention.restype = ctypes.c_int
    lib.packed_attention.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_int64]
                                     + [ctypes.c_void_p] + [ctypes.c_int64] * 4)
    lib.int8_query_attention.restype = ctypes.c_int
    lib.int8_query_attention.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 6
                                         + [ctypes.c_float, ctypes.c_int64, ctypes.c_int64])
    lib.hadamard_rows.restype = ctypes.c_int
    lib.hadamard_rows.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
                                  + [ctypes.c_float, ctypes.c_int64])
    lib.hadamard_codes.restype = ctypes.c_int
    lib.hadamard_codes.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
                                   + [ctypes.c_float, ctypes.c_int64, ctypes.c_float, ctypes.c_int64])
    lib.set_job_runner.restype = None
    lib.set_job_runner.argtypes = [ctypes.c_void_p]
    lib.job_runner_in_use.restype = ctypes.c_void_p
    return lib


@lru_cache(maxsize=None)
def library():
    """The loaded kernel library: the variant ``$QUAROT_FX_ISA`` names, else the best one this CPU
    runs and the compiler builds; or None (the reason in ``unavailable_reason()``)."""
    requested = _requested()
    for name in [requested] if requested else [v for v, _, _ in VARIANTS]:
        lib = load_variant(name)
        if lib is not None:
            return lib
    return None


def variant() -> str | None:
    """The instruction-set variant of the kernels in use ("avx512bf16", "avx512vnni", "avx2", "generic"), or None."""
    lib = library()
    return lib.isa_variant().decode() if lib is not None else None


_timer: list | None = None  # [nanoseconds] while ``timed()`` is active
CLOCKS: list = []  # nanosecond counters of C time spent outside ``_call`` (native_ops adds the C++ kernels')


def _call(kernel, *args):
    """Call a C kernel (timed inside ``timed()``)."""
    if _timer is None:
        return kernel(*args)
    start = time.perf_counter_ns()
    result = kernel(*args)
    _timer[0] += time.perf_counter_ns() - start
    return result


@contextmanager
def timed():
    """Seconds spent inside the C kernels while the block runs: ``with timed() as t: ...; t[0] / 1e9``
    (``speed.py`` splits a decode step into kernel time and overhead with it)."""
    global _timer
    outer, _timer = _timer, [0]
    elsewhere = sum(clock() for clock in CLOCKS)  # the calls that never enter Python time themselves
    try:
        yield _timer
    finally:
        if outer is not None:
            outer[0] += _timer[0]
        else:
            _timer[0] += sum(clock() for clock in CLOCKS) - elsewhere
        _timer = outer


def unavailable_reason() -> str | None:
    return _reason[-1] if library() is None else None


def applies(rows: int, in_features: int, group: int) -> bool:
    """Shapes the int4 kernels cover: one scale per output channel and sums the float emulation
    holds exactly in float32 (so both give the same bits); the GEMV (≤ ``FEW_ROWS`` rows) needs an
    even width, the GEMM (more rows) a width divisible by 4 and AVX2. Needs the library built."""
    if rows < 1 or group != in_features or in_features % 2 or in_features * 128 * 8 >= 2**24:
        return False
    return rows <= FEW_ROWS or (in_features % 4 == 0 and library() is not None and bool(library().gemm_available()))


def int4_linear(x2: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """float32 y [rows, out] from int8 codes x2 [rows, in], scales [rows, 1] and the packed
    weight [out, in/2] with channel scales [out, 1]: the GEMV up to ``FEW_ROWS`` rows, the
    blocked GEMM (on torch's thread count) beyond."""
    rows, out_features = x2.shape[0], weight.shape[0]
    x2, x_scale = x2.contiguous(), x_scale.reshape(rows).float().contiguous()
    weight, weight_scale = weight.contiguous(), weight_scale.reshape(out_features).float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    y = torch.empty((rows, out_features), dtype=torch.float32)
    pointers = (x2.data_ptr(), x_scale.data_ptr(), weight.data_ptr(), weight_scale.data_ptr(),
                bias.data_ptr() if bias is not None else None, y.data_ptr(), rows, in_features, out_features)
    if rows <= FEW_ROWS:
        _call(library().int4_gemv, *pointers)
    elif _call(library().int4_gemm, *pointers, torch.get_num_threads()):
        raise MemoryError(f"int4_gemm: no memory or thread for a {rows}x{in_features}->{out_features} GEMM")
    return y


def int32_epilogue(sums: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """float32 y = (sums · weight_scale) · x_scale (+ bias) over another GEMM's exact int32 sums
    [rows, out], in place (the result is a float32 view of the same bytes): one C pass, the
    same operations in the same order as the torch epilogue, so the same bits."""
    rows, out_features = sums.shape
    if sums.dtype != torch.int32 or not sums.is_contiguous():
        raise ValueError("int32_epilogue: the sums must be contiguous int32")
    x_scale, weight_scale = x_scale.reshape(rows).float().contiguous(), weight_scale.reshape(out_features).float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    if _call(library().int32_epilogue, sums.data_ptr(), x_scale.data_ptr(), weight_scale.data_ptr(),
             bias.data_ptr() if bias is not None else None, rows, out_features, torch.get_num_threads()):
        raise MemoryError("int32_epilogue: no thread for the epilogue")
    return sums.view(torch.float32)


def _cache_parts(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple:
    """KV codes, scales and zero points (float32 or uint8) as the C kernels read them."""
    return codes.contiguous(), scale.float().contiguous(), zero.float().contiguous()


def kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, length: int, packed: bool):
    """float32 (code - zero) · scale [..., length] from KV codes [..., bytes] and per-vector
    scale and zero ([..., 1]; the zero point float32 or uint8)."""
    row_bytes = codes.shape[-1]
    rows = codes.numel() // row_bytes if row_bytes else 0
    out = torch.empty((*codes.shape[:-1], length), dtype=torch.float32)
    if rows and length:
        codes, scale, zero = _cache_parts(codes, scale, zero)
        _call(library().kv_dequantize, codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), rows, length,
                                row_bytes, int(packed))
    return out


def kv_quantize(x: torch.Tensor, bits: int, clip: float, row_bytes: int, packed: bool):
    """(codes, scale, zero) as ``kv_quantize_reference`` gives them, or None where a vector holds
    a non-finite value (the reference then decides what those become)."""
    length = x.shape[-1]
    x = x.float().contiguous()
    rows = x.numel() // length if length else 0
    codes = torch.empty((*x.shape[:-1], row_bytes), dtype=torch.uint8)
    scale, zero = (torch.empty((*x.shape[:-1], 1), dtype=torch.float32) for _ in range(2))
    if rows and length and _call(library().kv_quantize, x.data_ptr(), codes.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                                 rows, length, row_bytes, bits, clip, int(packed),
                                                 torch.get_num_threads()):
        return None
    return codes, scale, zero


def packed_attention(q: torch.Tensor, keys: tuple, values: tuple, length: int, packed: bool, scale: float,
                     causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32 attention output [batch, q_heads, rows, length] of float32 q over the packed cache's
    (codes, scale, zero) for keys and values, [batch, kv_heads, tokens, ...] each; ``mask`` (or
    None): SDPA's attn_mask, boolean (True: attend) or additive float, broadcastable to
    [batch, q_heads, rows, tokens]."""
    q = q.contiguous()
    keys, values = _cache_parts(*keys), _cache_parts(*values)
    batch, q_heads, rows, _ = q.shape
    kv_heads, tokens, row_bytes = keys[0].shape[1:]
    out = torch.empty_like(q)
    mask_args = (None, 0, 0, 0)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=torch.float32).masked_fill(~mask, float("-inf"))
        mask = mask.float().expand(batch, q_heads, rows, tokens)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_args = (mask.data_ptr(), *mask.stride()[:3])
    if _call(library().packed_attention, q.data_ptr(), *(t.data_ptr() for t in (*keys, *values)), out.data_ptr(), batch,
             q_heads, kv_heads, rows, tokens, length, row_bytes, int(packed), scale, int(causal), *mask_args,
             torch.get_num_threads()):
        raise MemoryError("packed_attention: no memory for its blocks")
    return out


def int8_query_attention(q: torch.Tensor, keys: tuple, values: tuple, scale: float, causal: bool):
    """float32 attention output of float32 q [batch, q_heads, rows, d] over a 4-bit packed cache's
    (codes, scale, zero) for keys and values [batch, kv_heads, tokens, ...], with Q·Kᵀ in integers
    (``native.c int8_query_attention``), or None where this build cannot (no AVX2, d % 8)."""
    q = q.contiguous()
    keys, values = _cache_parts(*keys), _cache_parts(*values)
    batch, q_heads, rows, d = q.shape
    kv_heads, tokens = keys[0].shape[1:3]
    out = torch.empty_like(q)
    status = _call(library().int8_query_attention, q.data_ptr(), *(t.data_ptr() for t in (*keys, *values)),
                   out.data_ptr(), batch, q_heads, kv_heads, rows, tokens, d, scale, int(causal), torch.get_num_threads())
    if status == 1:
        raise MemoryError("int8_query_attention: no memory for its blocks")
    return None if status else out


@lru_cache(maxsize=None)
def _stages(orders: tuple, matrices: tuple) -> tuple:
    """ctypes arrays of the factor orders and matrix pointers (NULL: a Sylvester factor; the
    matrices are cached tensors)."""
    return ((ctypes.c_int64 * len(orders))(*orders),
            (ctypes.c_void_p * len(matrices))(*(h.data_ptr() if h is not None else None for h in matrices)), matrices)


def hadamard_rows(y: torch.Tensor, orders: tuple, matrices: tuple, scale: float) -> torch.Tensor:
    """y [batch, n] float32 times (F_1 ⊗ … ⊗ F_c ⊗ I_inner)·scale (inner = n / the orders' product),
    ``orders[i]`` the order of F_i and ``matrices[i]`` its float32 matrix, or None for a Sylvester
    factor (butterflies); the rows split over torch's thread count (same bits on any count)."""
    y = y.contiguous()
    out = torch.empty_like(y)
    order_array, pointer_array, _ = _stages(orders, matrices)
    if _call(library().hadamard_rows, y.data_ptr(), out.data_ptr(), y.shape[0], y.shape[1], len(orders), order_array,
             pointer_array, scale, torch.get_num_threads()):
        raise MemoryError("hadamard_rows: no memory or thread for its blocks")
    return out


def hadamard_codes(y: torch.Tensor, orders: tuple, matrices: tuple, scale: float, bits: int,
                   divisor: float) -> tuple | None:
    """``hadamard_rows`` then per-row symmetric quantization in one pass over each block of rows:
    (int8 codes [batch, n], float32 scales [batch, 1]) with the bits of ``activation_codes`` on the
    transformed rows (step max|y| / divisor, 1 where 0; codes rounded half to even into
    [-2^(bits-1), 2^(bits-1) - 1]), or None where a value is not finite (the caller's reference decides)."""
    y = y.contiguous()
    codes = torch.empty(y.shape, dtype=torch.int8)
    scales = torch.empty((y.shape[0], 1), dtype=torch.float32)
    order_array, pointer_array, _ = _stages(orders, matrices)
    status = library().hadamard_codes(y.data_ptr(), codes.data_ptr(), scales.data_ptr(), y.shape[0], y.shape[1],
                                      len(orders), order_array, pointer_array, scale, bits, divisor,
                                      torch.get_num_threads())
    if status == 1:
        raise MemoryError("hadamard_codes: no memory or thread for its blocks")
    return None if status else (codes, scales)


def int8_weight_linear(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       threads: int) -> torch.Tensor:
    """float32 y [rows, n] = (x2 · weightᵀ) · scale (+ bias) for float32 x2 [rows, k] and int8
    weight [n, k] with scale [n]; the sums in ``int8_linear_reference``'s order."""
    x2, weight, scale = x2.float().contiguous(), weight.contiguous(), scale.reshape(-1).float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    y = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.float32)
    _call(library().int8_weight_linear, x2.data_ptr(), weight.data_ptr(), scale.data_ptr(),
                                 bias.data_ptr() if bias is not None else None, y.data_ptr(), x2.shape[0],
                                 x2.shape[1], weight.shape[0], threads)
    return y


def int8_codes_linear(codes: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """float32 y [rows, n] = ((acc · scale) · x_scale) (+ bias), acc = codes · weightᵀ exactly, for
    int8 codes [rows, k] with x_scale [rows, 1] and int8 weight [n, k] with scale [n, 1]."""
    codes, weight = codes.contiguous(), weight.contiguous()
    x_scale, scale = x_scale.reshape(-1).float().contiguous(), scale.reshape(-1).float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    y = torch.empty((codes.shape[0], weight.shape[0]), dtype=torch.float32)
    _call(library().int8_codes_linear, codes.data_ptr(), x_scale.data_ptr(), weight.data_ptr(), scale.data_ptr(),
          bias.data_ptr() if bias is not None else None, y.data_ptr(), codes.shape[0], codes.shape[1],
          weight.shape[0], threads)
    return y


# The C kernels as a candidate of int_gemm's choice (kernels/gemm.py): the whole linear on the packed bytes.
register_gemm("int4", lambda rows, k, n, group, dense: dense and applies(rows, k, group) and library() is not None,
              linear=lambda *args: int4_linear(*args))  # looked up per call (tests wrap it)
