"""Triton helpers shared by the ``triton_*`` kernels (imports nothing from the op modules)."""

import triton
import triton.language as tl


@triton.jit
def signed_nibble(byte):
    """The two's complement value of the low nibble of ``byte``: (n ^ 8) - 8, as in
    :func:`quarot_fx.kernels.common.signed_nibbles`."""
    return ((byte & 0xF) ^ 8) - 8
