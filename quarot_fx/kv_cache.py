"""KV caches that hold codes: ``PackedKVCache`` (grows) and ``PackedStaticKVCache`` (preallocated).

transformers' caches hold float tensors, so a quantized KV cache stored there saves no memory.
These keep, per head vector, the asymmetric codes (two per byte at ≤ 4 bits), a float32 scale and
a one-byte zero point: 37 bytes per 64-dim head vector at 4 bits against 128 in fp16 (0.29×).
Attention gets one layer's keys and values dequantized at a time (a transient, not a copy of the
cache).

Used eagerly, a layer quantizes what it is given (clip 1). Under quarot-fx the compiler finds the
cache's quantize → store → dequantize chain in the graph, rotates in front of it (R2/R3) and gives
its quantizer the compiled model's ``kv_bits`` and clip (searched clips included): the codes stored
are those of the integer path, so the logits equal those of the same compiled model with a float
cache. A quarot-compiled model with ``kv_bits < 16`` creates a ``PackedKVCache`` itself when it is
called with ``use_cache`` and no cache, or with an empty ``DynamicCache``/``StaticCache``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from .kernels.common import check_bits, kv_code_bytes
from .kernels.kv_quant import KV_DEQUANTIZE, KV_QUANTIZE

PARTS = ("codes", "scale", "zero")
ZERO_DTYPE = torch.uint8  # zero points are integers in [0, 2^b - 1]


def _empty_parts(lead, length: int, bits: int, rows: int, device) -> tuple[torch.Tensor, ...]:
    return (torch.zeros((*lead, rows, kv_code_bytes(length, bits)), dtype=torch.uint8, device=device),
            torch.zeros((*lead, rows, 1), dtype=torch.float32, device=device),
            torch.zeros((*lead, rows, 1), dtype=ZERO_DTYPE, device=device))


def _encode(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    codes, scale, zero = KV_QUANTIZE(x, bits, 1.0)
    return codes, scale, zero.to(ZERO_DTYPE)


class _PackedLayer:
    """What both layer kinds share: six tensors (codes, scale, zero of keys and of values)."""

    @property
    def bits(self) -> int:
        """Bits per code. Held as a string: Dynamo keeps a string attribute a constant of the graph,
        while an int one that differs between calls of one forward (two models of other
        ``kv_bits`` in one process) becomes symbolic, and the compiler needs the number."""
        return int(self._bit_width)

    @bits.setter
    def bits(self, value: int) -> None:
        self._bit_width = str(value)

    def _parts(self, kind: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{kind}_{p}") for p in PARTS)

    def _set(self, kind: str, parts) -> None:
        for p, t in zip(PARTS, parts):
            setattr(self, f"{kind}_{p}", t)

    def _one_length(self) -> None:
        """Tell the compiler what always holds: the six tensors hold the same number of tokens.
        Dynamo otherwise gives each its own size symbol, and a compiled decode step then reads and
        passes up to six sizes per layer instead of one (SmolLM2's decode graph: 150, ~0.3 ms a step)."""
        tokens = self.key_codes.shape[-2]
        parts = (*self._parts("key"), *self._parts("value"))
        if not torch.compiler.is_compiling() and any(t.shape[-2] != tokens for t in parts):
            raise ValueError(f"packed KV cache layer: its tensors hold {[t.shape[-2] for t in parts]} tokens "
                             f"({', '.join(f'{k}_{p}' for k in ('key', 'value') for p in PARTS)}): they were "
                             "changed apart; change a cache through its methods (crop, reorder_cache, ...)")
        for t in parts:  # (a message function here would break Dynamo's graph)
            torch._check(t.shape[-2] == tokens)

    def _dequantize(self, kind: str) -> torch.Tensor:
        length = self.head_dims[0 if kind == "key" else 1]
        return KV_DEQUANTIZE(*self._parts(kind), self.bits, length, self.dtype)

    def _map(self, fn) -> None:
        if self.is_initialized:
            for kind in ("key", "value"):
                self._set(kind, [fn(t) for t in self._parts(kind)])

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as attention sees them."""
        return self._dequantize("key"), self._dequantize("value")

    def nbytes(self) -> int:
        """Bytes the layer holds (codes, scales, zero points)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for kind in ("key", "value") for t in self._parts(kind))

    def _start(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.head_dims = (key_states.shape[-1], value_states.shape[-1])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.key_codes.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))


class PackedDynamicLayer(_PackedLayer, DynamicLayer):
    """A growing layer of codes (``DynamicLayer``'s contract)."""

    def __init__(self, bits: int = 4, **kwargs):
        super().__init__(**kwargs)
        check_bits(bits, "bits")
        self.bits = bits

    def lazy_initialization(self, key_states, value_states) -> None:
        self._start(key_states, value_states)
        lead = key_states.shape[:2]
        self._set("key", _empty_parts(lead, self.head_dims[0], self.bits, 0, self.device))
        self._set("value", _empty_parts(lead, self.head_dims[1], self.bits, 0, self.device))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._one_length()
        for kind, x in (("key", key_states), ("value", value_states)):
            self._set(kind, [torch.cat([old, new], dim=-2) for old, new in zip(self._parts(kind), _encode(x, self.bits))])
        return self.dequantized()

    def get_seq_length(self) -> int:
        return self.key_codes.shape[-2] if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._map(lambda t: t[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.is_initialized = False
        super().reset()


class PackedStaticLayer(_PackedLayer, StaticLayer):
    """A preallocated layer of codes (``StaticLayer``'s contract: written in place)."""

    def __init__(self, max_cache_len: int, bits: int = 4, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        check_bits(bits, "bits")
        self.bits = bits

    def lazy_initialization(self, key_states, value_states) -> None:
        self._start(key_states, value_states)
        self.batch_size, self.num_heads = key_states.shape[:2]
        lead = key_states.shape[:2]
        self._set("key", _empty_parts(lead, self.head_dims[0], self.bits, self.max_cache_len, self.device))
        self._set("value", _empty_parts(lead, self.head_dims[1], self.bits, self.max_cache_len, self.device))
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for kind in ("key", "value"):
                for t in self._parts(kind):
                    torch._dynamo.mark_static_address(t)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._one_length()
        position = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        for kind, x in (("key", key_states), ("value", value_states)):
            for stored, new in zip(self._parts(kind), _encode(x, self.bits)):
                stored.index_copy_(2, position, new)
        return self.dequantized()

    def reset(self) -> None:
        self._map(torch.zero_)
        self.cumulative_length.zero_()


def _layers_like(template: Cache, make) -> list:
    """One packed layer per layer of a transformers cache built from the model config; layer
    kinds other than full attention (sliding windows, linear attention) are refused by name."""
    layers = []
    for i, layer in enumerate(template.layers):
        if type(layer) not in (DynamicLayer, StaticLayer):
            raise ValueError(f"packed KV cache: layer {i} is a {type(layer).__name__}; only full-attention layers "
                             "(DynamicLayer/StaticLayer) are packed: use transformers' cache (kv_cache='float')")
        layers.append(make())
    return layers


class _PackedCache:
    bits: int

    def nbytes(self) -> int:
        """Bytes held by every layer (codes, scales and zero points)."""
        return sum(layer.nbytes() for layer in self.layers)

    def dequantized(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer as attention sees them."""
        return self.layers[layer_idx].dequantized()


class PackedKVCache(_PackedCache, Cache):
    """A ``DynamicCache`` that stores ``bits``-bit codes (2–8) instead of float keys and values."""

    def __init__(self, config=None, bits: int = 4):
        check_bits(bits, "bits")
        self.bits = bits
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: PackedDynamicLayer(bits))
        else:
            from transformers.cache_utils import DynamicCache

            super().__init__(layers=_layers_like(DynamicCache(config=config), lambda: PackedDynamicLayer(bits)))


class PackedStaticKVCache(_PackedCache, Cache):
    """A ``StaticCache`` of ``max_cache_len`` tokens that stores ``bits``-bit codes."""

    def __init__(self, config, max_cache_len: int, bits: int = 4):
        from transformers.cache_utils import StaticCache

        check_bits(bits, "bits")
        self.bits = bits
        template = StaticCache(config=config, max_cache_len=max_cache_len)
        super().__init__(layers=_layers_like(template, lambda: PackedStaticLayer(max_cache_len, bits)))
