"""Custom ops of quarot-fx (importable as ``quarot_fx.kernels``): CPU kernels, fakes, Triton for CUDA.

Importing this package registers the ops under the ``quarot_fx`` torch.library namespace:
``hadamard_transform``, ``pack_int4`` / ``unpack_int4``, ``quantize_per_token`` (optionally
fused with the Hadamard), ``quantized_linear`` (packed int4 weights), ``int8_weight_linear`` and ``int8_dynamic_linear`` (the 8-bit head, float or int8 activations), ``sparse_quantized_linear`` (pruned int4 weights stored
compressed), ``kv_quantize`` /
``kv_dequantize``, ``packed_attention`` (SDPA over the packed KV cache) and
``int8_query_attention`` (the same with a prefill's Q·Kᵀ in integers). Each has a plain-torch ``*_reference`` beside it. Triton modules are
imported lazily, only for CUDA tensors or by tests.
"""

if __name__ == "quarot_fx.kernels":
    from .activation_quant import quantize_per_token, quantize_per_token_reference
    from .hadamard_transform import hadamard_transform, hadamard_transform_reference
    from .int4 import pack_int4, pack_int4_reference, unpack_int4, unpack_int4_reference
    from .int8_linear import (int8_dynamic_linear, int8_dynamic_linear_reference, int8_linear_reference,
                              int8_weight_linear)
    from .kv_quant import kv_dequantize, kv_dequantize_reference, kv_quantize, kv_quantize_reference
    from .packed_attention import (int8_query_attention, int8_query_attention_reference, packed_attention,
                                   packed_attention_reference)
    from .quantized_linear import (pack_linear_weight, quantized_linear, quantized_linear_reference,
                                   unpack_linear_weight)
    from .sparse_linear import sparse_quantized_linear

    __all__ = ["hadamard_transform", "hadamard_transform_reference", "int8_dynamic_linear",
               "int8_dynamic_linear_reference", "int8_linear_reference",
               "int8_query_attention", "int8_query_attention_reference",
               "int8_weight_linear", "kv_dequantize", "kv_dequantize_reference",
               "kv_quantize", "kv_quantize_reference", "pack_int4", "pack_int4_reference", "pack_linear_weight", "packed_attention",
               "packed_attention_reference", "quantize_per_token",
               "quantize_per_token_reference", "quantized_linear", "quantized_linear_reference", "sparse_quantized_linear", "unpack_int4",
               "unpack_int4_reference", "unpack_linear_weight"]
else:
    # Imported as a top-level ``kernels`` (the repository root is on sys.path, e.g. under
    # ``python -m``): that is transformers probing for the PyPI package of the same name.
    # Register nothing, or the ops would be defined twice with distinct OpOverload objects.
    __all__ = []
