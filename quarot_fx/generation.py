"""``generate()`` on a quarot-compiled model runs the compiled forward, not the eager one.

``torch.compile(model)`` returns an ``OptimizedModule`` whose compiled part is its own
``__call__``; any other attribute, ``generate`` included, is looked up on the original model,
whose ``generate`` then calls the original (float) forward: the backend would never run.
For modules compiled with ``backend="quarot"`` this module routes ``generate`` through a
shallow copy of the model whose ``forward`` is the compiled call. The copy shares every
parameter and buffer; the user's model is not modified.

Calls (and generate's steps) with ``use_cache`` and no cache, or an empty ``DynamicCache`` or
``StaticCache``, get a packed KV cache (:mod:`quarot_fx.kv_cache`) when ``kv_bits < 16``: the cache
memory really drops instead of holding dequantized floats.

The routing is installed on ``OptimizedModule.__getattr__`` when quarot-fx is imported (which
``torch.compile(..., backend="quarot")`` does when it resolves the backend) and changes nothing
for modules compiled with other backends.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
import weakref

import torch
from torch._dynamo.eval_frame import OptimizedModule, innermost_backend


def compiled_with_quarot(module: torch.nn.Module) -> bool:
    """True for what ``torch.compile(..., backend="quarot")`` returned."""
    if not isinstance(module, OptimizedModule):
        return False
    callback = getattr(module.__dict__.get("dynamo_ctx"), "callback", None)
    if not callable(callback):
        return False
    backend = innermost_backend(callback)
    return getattr(backend, "compiler_name", None) == "quarot"


def compiled_options(module: OptimizedModule):
    """The QuaRotConfig a quarot-compiled module was compiled with."""
    from .config import QuaRotConfig

    backend = innermost_backend(module.__dict__["dynamo_ctx"].callback)
    return QuaRotConfig.from_options(getattr(backend, "kwargs", {}).get("options"))


_PACKED_FOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # user's empty cache → ours


def with_packed_cache(compiled: OptimizedModule, kwargs: dict) -> dict:
    """``kwargs`` with a packed KV cache (quarot_fx.kv_cache) where the model would otherwise fill
    a float one: no cache and ``use_cache``, or an empty ``DynamicCache``/``StaticCache`` (the same
    packed cache each time that object is passed again). Any other cache is left to the
    foreign-cache check."""
    from transformers.cache_utils import DynamicCache, StaticCache

    from .kv_cache import PackedKVCache, PackedStaticKVCache

    model = compiled._orig_mod
    model_config = getattr(model, "config", None)
    if model_config is None or not callable(getattr(model_config, "get_text_config", None)):
        return kwargs
    options = compiled_options(compiled)
    bits = options.kv_bits
    names = [n for n in ("cache", "past_key_values") if n in inspect.signature(model.forward).parameters]
    if bits >= 16 or options.kv_cache != "packed" or not names:
        return kwargs
    name = next((n for n in ("cache", "past_key_values") if kwargs.get(n) is not None), names[0])
    cache = kwargs.get(name)
    if cache is None:
        use_cache = kwargs.get("use_cache")
        if not (use_cache if use_cache is not None else getattr(model_config, "use_cache", False)):
            return kwargs
        packed = _packed_or_none(lambda: PackedKVCache(model_config, bits))
    elif type(cache) in (DynamicCache, StaticCache) and int(cache.get_seq_length()) == 0:
        packed = _PACKED_FOR.get(cache)
        if packed is None:
            packed = _packed_or_none(lambda: PackedKVCache(model_config, bits) if type(cache) is DynamicCache else
                                     PackedStaticKVCache(model_config, cache.get_max_length(), bits))
            if packed is not None:
                _PACKED_FOR[cache] = packed
    else:
        return kwargs
    return kwargs if packed is None else {**kwargs, name: packed}


def _packed_or_none(make):
    """A packed cache, or None (with a warning) for models with layers it does not pack, e.g.
    sliding windows: they keep transformers' float cache, whose numbers are the same."""
    try:
        return make()
    except ValueError as refusal:
        from .report import QuaRotWarning

        warnings.warn(QuaRotWarning(f"quarot-fx: {refusal}; this call keeps transformers' own KV cache"), stacklevel=3)
        return None


def quantized_generate(compiled: OptimizedModule, *args, **kwargs):
    """``compiled._orig_mod.generate(...)`` with every forward step through the compiled model."""
    proxy = copy.copy(compiled._orig_mod)  # shares _parameters, _buffers and _modules

    @functools.wraps(compiled._orig_mod.forward)  # generate() reads the forward's signature
    def forward(*a, **k):
        return compiled.forward(*a, **with_packed_cache(compiled, k))

    proxy.forward = forward  # the compiled __call__ of the original model
    return proxy.generate(*args, **kwargs)


def install() -> None:
    """Make ``generate`` on quarot-compiled modules quantized, and their calls use a packed KV
    cache (idempotent)."""
    original, call = OptimizedModule.__getattr__, OptimizedModule.__call__
    if getattr(original, "_quarot_fx", False):
        return

    def __getattr__(self, name):
        attribute = original(self, name)
        if name == "generate" and compiled_with_quarot(self):
            return functools.partial(quantized_generate, self)
        return attribute

    def __call__(self, *args, **kwargs):
        if compiled_with_quarot(self):
            kwargs = with_packed_cache(self, kwargs)
        return call(self, *args, **kwargs)

    __getattr__._quarot_fx = True
    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule.__call__ = __call__
