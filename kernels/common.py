"""What the op families share, below all of them: input checks, row blocking, Hadamard stage
matrices, the int4 nibble decode and the KV-code layout.

Dependency rule of ``kernels/``: an op module (``hadamard_transform``, ``int4``,
``activation_quant``, ``kv_quant``, ``quantized_linear``) may import this module and, lazily,
its own ``triton_*`` module; a ``triton_*`` module imports only this module and
``triton_common``. So there is no import cycle.
"""

from __future__ import annotations

import functools
from functools import lru_cache

import torch

from quarot_fx.numerics.hadamard import factor_matrix

CHUNK_BYTES = 1 << 19  # rows are processed in blocks of about this size, so every stage stays in cache


def row_chunks(rows: int, row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> list[slice]:
    """Row blocks of about ``chunk_bytes`` (at least one row each)."""
    step = max(1, chunk_bytes // max(row_bytes, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def check_bits(bits: int, name: str = "bits") -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"{name} must be in 2..8 for integer kernels; got {bits}")


def check_inputs(x: torch.Tensor, bits: int, clip: float, op: str = "quantize_per_token") -> None:
    check_bits(bits)
    if not x.is_floating_point():
        raise TypeError(f"{op} needs a floating-point tensor, got {x.dtype}")
    if not 0 < clip <= 1:
        raise ValueError(f"clip must be in (0, 1]; got {clip}")


def check_hadamard(x: torch.Tensor, inner: int) -> int:
    """The Hadamard order m of ``hadamard_transform(x, inner)`` (last dim = m · inner)."""
    if inner < 1 or x.shape[-1] % inner:
        raise ValueError(f"hadamard_transform: inner={inner} must divide the last dimension {x.shape[-1]}")
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    return x.shape[-1] // inner


def check_int4_values(q: torch.Tensor) -> None:
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 values in [-8, 7], got {q.dtype}")


@lru_cache(maxsize=None)
def stage_matrix(order: int, scale: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    """One Kronecker factor of a Hadamard matrix, scaled, on a device; cached across calls."""
    return (factor_matrix(order, torch.float64) * scale).to(device=device, dtype=dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types accumulate in float32; float32 and float64 stay as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def signed_nibbles(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) int8 values of uint8 bytes holding two's complement nibbles.

    Read as int8, an arithmetic right shift by 4 sign-extends the high nibble, and shifting the
    low nibble up first does the same for it: two vectorized ops per nibble, ~18× faster on CPU
    than masking and re-biasing (``triton_common`` decodes the same way as (n ^ 8) - 8)."""
    signed = packed.view(torch.int8)
    return (signed << 4) >> 4, signed >> 4


def kv_packs(bits: int) -> bool:
    """KV codes of ≤ 4 bits are stored two per byte (as code - 8, in the pack_int4 layout)."""
    return bits <= 4


def kv_code_bytes(length: int, bits: int) -> int:
    return (length + 1) // 2 if kv_packs(bits) else length


@lru_cache(maxsize=1)
def cpu_description() -> tuple[str, ...]:
    """The distinct "model name" and "flags" lines of /proc/cpuinfo (empty off Linux): what the
    C kernels' cache key and the GEMM report name the CPU by. Read once per process."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    return tuple(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


_LIBRARY = torch.library.Library("quarot_fx", "FRAGMENT")


class Op:
    """``quarot_fx::<name>``, defined from ``fn``'s annotations with ``fn`` as its kernel on every
    device (another device's kernel, a fake and an autograd formula registered as on
    ``torch.library.custom_op``'s result).

    Why not ``custom_op``: its per-call Python layers (an autograd wrapper even under ``no_grad``,
    output-aliasing checks) cost 8-25 µs a call, more than the int4 GEMV of a decode step; a
    decode step calls these ops hundreds of times. A plain ``torch.library`` definition reaches
    ``fn`` in about 5 µs. Calling the object calls the op; ``.default`` is its OpOverload (what
    graphs hold and ``torch.library.opcheck`` takes)."""

    def __init__(self, qualname: str, fn, python_twin: bool = False):
        namespace, name = qualname.split("::")
        self.qualname = qualname
        schema = torch.library.infer_schema(fn, mutates_args=())
        torch.library.define(qualname, schema, lib=_LIBRARY)
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        self.twin = f"{namespace}::_{name}_python" if python_twin else None
        if python_twin:  # where the C++ CPU kernel (native_ops.cpp) does not apply, it calls this
            torch.library.define(self.twin, schema, lib=_LIBRARY)
            _LIBRARY.impl(f"_{name}_python", fn, "CompositeExplicitAutograd")
        self.default = getattr(getattr(torch.ops, namespace), name).default
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname, fn, lib=_LIBRARY)
        return fn

    def register_kernel(self, device: str):
        def register(fn):
            torch.library.register_kernel(self.qualname, device, fn, lib=_LIBRARY)
            return fn
        return register

    def register_autograd(self, backward, setup_context=None) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIBRARY)
        if self.twin is not None:  # the C++ autograd layer sends calls that want a gradient there
            torch.library.register_autograd(self.twin, backward, setup_context=setup_context, lib=_LIBRARY)


def define_op(qualname: str, python_twin: bool = False):
    """Decorator: ``Op(qualname, fn)`` (see ``Op``). ``python_twin``: also define
    ``quarot_fx::_<name>_python`` with ``fn``, the fallback of the op's C++ CPU kernel
    (``native_ops``)."""
    return lambda fn: Op(qualname, fn, python_twin)
