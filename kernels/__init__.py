"""Custom ops of quarot-fx (importable as ``quarot_fx.kernels``): CPU kernels, fakes, Triton for CUDA.

Importing this package registers the ops under the ``quarot_fx`` torch.library namespace.
Triton modules are imported lazily, only for CUDA tensors or by tests.
"""

from .hadamard_transform import hadamard_transform, hadamard_transform_reference
from .int4 import pack_int4, pack_int4_reference, unpack_int4, unpack_int4_reference

__all__ = ["hadamard_transform", "hadamard_transform_reference", "pack_int4", "pack_int4_reference",
           "unpack_int4", "unpack_int4_reference"]
