"""quarot-fx's C kernel (``int4_gemv.c``), built with the system C compiler once per machine.

Why C: at decode a linear is a GEMV that reads each weight once, so its speed is the bytes it
reads. No torch op runs an exact int4 × int8 GEMV fast on an AVX2 CPU (``_int_mm``,
``_weight_int8pack_mm`` and Inductor's generated loop over the packed bytes all measured slower
than the fp32 matmul), while AVX2's byte multiply-add reads the packed weight directly.

The library is compiled with ``-march=native`` (so it is tied to this CPU: the cache key holds
the CPU's model and flags, the compiler and the source) into ``$QUAROT_FX_CACHE`` or
``~/.cache/quarot_fx``, and loaded with ctypes, which releases the GIL during the call. Without a
compiler the kernel is simply unavailable (``unavailable_reason()``) and ``int_gemm`` never picks
it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int4_gemv.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC")
MAX_ROWS = 16  # the kernel's row limit (decode and small batches)
_reason: list[str] = []


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown cpu"
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))


def _cache_dir() -> Path:
    return Path(os.environ.get("QUAROT_FX_CACHE", Path.home() / ".cache" / "quarot_fx"))


@lru_cache(maxsize=None)
def library():
    """The loaded kernel library, or None (the reason in ``unavailable_reason()``)."""
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_identity()])
                             .encode()).hexdigest()[:16]
        target = _cache_dir() / f"int4_gemv-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                               check=True)
                built.replace(target)  # atomic: concurrent builders all end with a whole file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        _reason.append(f"the C kernel did not build with {compiler!r}: {detail.strip()[:300]}")
        return None
    fn = lib.int4_gemv
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5
    return fn


def unavailable_reason() -> str | None:
    return _reason[-1] if library() is None else None


def applies(rows: int, in_features: int, group: int) -> bool:
    """Shapes the kernel covers: at most ``MAX_ROWS`` rows, one scale per output channel, an even
    width, and sums the float emulation holds exactly in float32 (so both give the same bits)."""
    return 1 <= rows <= MAX_ROWS and group == in_features and in_features % 2 == 0 and in_features * 128 * 8 < 2**24


def int4_linear(x2: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """float32 y [rows, out] from int8 codes x2 [rows, in], scales [rows, 1] and the packed
    weight [out, in/2] with channel scales [out, 1]."""
    rows, out_features = x2.shape[0], weight.shape[0]
    x2, x_scale = x2.contiguous(), x_scale.reshape(rows).float().contiguous()
    weight, weight_scale = weight.contiguous(), weight_scale.reshape(out_features).float().contiguous()
    bias = bias.float().contiguous() if bias is not None else None
    y = torch.empty((rows, out_features), dtype=torch.float32)
    library()(x2.data_ptr(), x_scale.data_ptr(), weight.data_ptr(), weight_scale.data_ptr(),
              bias.data_ptr() if bias is not None else None, y.data_ptr(), rows, in_features, 0, out_features,
              out_features)
    return y
