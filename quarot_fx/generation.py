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

Every call of a quarot-compiled module (and every step of its ``generate``) goes through
:func:`quarot_call`, which keeps three promises:

* **quantized on every call, or an error**: past Dynamo's recompile limit a frame would run the
  original float model; for our calls ``fail_on_recompile_limit_hit`` is on, and the hit becomes a
  :class:`RecompileLimitError` that says what to do;
* **a bounded number of graphs**: the batch and sequence dimensions of the inputs and of the cache
  are marked dynamic from the first call, so prompts of any batch size and length share a handful
  of graphs: prefill and decode, each with batch 1 and batch > 1 (Dynamo specializes sizes 0 and
  1), with and without an attention mask, prompts of one token. That can pass Dynamo's default
  limit of 8, so while the limit is 8 our calls get ``RECOMPILE_LIMIT`` (64); any other limit
  the user set is kept;
* **the cache stays the model's own** through transformers' cache operations (beam search's
  ``reorder_cache``, ``crop``, ``batch_repeat_interleave``, ``batch_select_indices``): they replace
  the cache's tensors by new ones, which the compiled graph would refuse as foreign
  (``ForeignCacheError``). A cache object a compiled call filled is marked with its owner and its
  length; before the next call its tensors are marked again, unless something else appended to it.

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
from torch._dynamo.exc import FailOnRecompileLimitHit

CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers 5 names its cache argument either way
DYNAMIC_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position")
RECOMPILE_LIMIT = 64  # graphs per forward code (all models of a class) while Dynamo's limit is its default
DYNAMO_DEFAULT_LIMIT = torch._dynamo.config._config["recompile_limit"].default  # 8
OWNED = "_quarot_fx_owned"  # on a cache object: (owner signature, sequence length after our call)


class RecompileLimitError(RuntimeError):
    """Dynamo would run the float model for this call: its recompile limit is reached."""


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
    """The QuaRotConfig a quarot-compiled module was compiled with (read once per module)."""
    config = _CONFIGS.get(module)
    if config is None:
        from .config import QuaRotConfig

        backend = innermost_backend(module.__dict__["dynamo_ctx"].callback)
        config = QuaRotConfig.from_options(getattr(backend, "kwargs", {}).get("options"))
        _CONFIGS[module] = config
    return config


_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # compiled module → its QuaRotConfig
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # compiled modules whose model passed check_model


def check_model(model: torch.nn.Module, config) -> None:
    """What would otherwise fail deep inside the compiler with a message about something else:
    weights never loaded (the meta device), calibration token ids the model has no embedding for."""
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"quarot-fx: {meta[0]} (and {len(meta) - 1} more parameters) is on the meta device: its "
                         "weights were never loaded (e.g. device_map='meta' or init_empty_weights). Load the "
                         "weights before compiling.")
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = getattr(embedding, "num_embeddings", None)
    for i, ids in enumerate(config.calibration or ()):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"calibration[{i}] holds token id {low if low < 0 else high}, outside the model's "
                             f"vocabulary (0..{vocab - 1 if vocab else '?'}): tokenize calibration text with this "
                             "model's own tokenizer")


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
    names = _cache_arguments(model.forward)
    if bits >= 16 or options.kv_cache != "packed" or not names:
        return kwargs
    name = next((n for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), names[0])
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


def _cache_arguments(forward) -> tuple:
    """The cache argument names ``forward`` takes. Once per forward function: ``inspect.signature``
    of a transformers forward costs tens of microseconds, and a decode step calls this each time."""
    function = getattr(forward, "__func__", None)
    if function is None:
        return tuple(n for n in CACHE_ARGUMENTS if n in inspect.signature(forward).parameters)
    return _function_cache_arguments(function)


@functools.lru_cache(maxsize=64)
def _function_cache_arguments(function) -> tuple:
    parameters = inspect.signature(function).parameters
    return tuple(n for n in CACHE_ARGUMENTS if n in parameters)


def _packed_or_none(make):
    """A packed cache, or None (with a warning) for models with layers it does not pack, e.g.
    sliding windows: they keep transformers' float cache, whose numbers are the same."""
    try:
        return make()
    except ValueError as refusal:
        from .report import QuaRotWarning

        warnings.warn(QuaRotWarning(f"quarot-fx: {refusal}; this call keeps transformers' own KV cache"), stacklevel=3)
        return None


CACHE_DIMS = frozenset((0, 2))  # a cache tensor's batch and token dimensions
_NO_DIMS = frozenset()


def _mark_dynamic(args, kwargs, cache_tensors: list) -> None:
    """Batch and sequence dimensions of the model's inputs and cache dynamic from the first call
    (sizes 0 and 1 stay specialized: Dynamo's rule), so new prompt shapes reuse the graphs."""
    inputs = [kwargs.get(name) for name in DYNAMIC_INPUTS] + list(args[:1])
    for tensor in inputs:
        if isinstance(tensor, torch.Tensor):
            for dim in range(min(tensor.dim(), 2)):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
    for tensor in cache_tensors:
        # [batch, heads, tokens, ...]; a static cache's tensors stay marked from step to step (where
        # Dynamo keeps its marks, else they are marked again): a decode step then skips ~0.5 ms of marking
        if tensor.dim() >= 3 and not CACHE_DIMS <= getattr(tensor, "_dynamo_weak_dynamic_indices", _NO_DIMS):
            torch._dynamo.maybe_mark_dynamic(tensor, list(CACHE_DIMS))


def _recompile_patches() -> dict:
    patches = {"fail_on_recompile_limit_hit": True}
    config = torch._dynamo.config
    if config.recompile_limit == DYNAMO_DEFAULT_LIMIT:
        patches["recompile_limit"] = RECOMPILE_LIMIT
    return patches


def _cache_in(kwargs):
    return next((kwargs[n] for n in CACHE_ARGUMENTS if kwargs.get(n) is not None), None)


def _cache_tensors(cache) -> list:
    """The tensors a cache's layers hold (one list per call: claiming and marking both walk it)."""
    return [value for layer in getattr(cache, "layers", ()) for value in vars(layer).values()
            if isinstance(value, torch.Tensor)]


def _claim(cache, owner: str, tensors: list) -> None:
    """Mark again the tensors of a cache a compiled call of ``owner`` filled: transformers'
    cache operations (reorder, crop, repeat, select) replace them by new, unmarked tensors. Not
    when it has grown since (something else appended to it): the graph then refuses it."""
    from .backend import KV_OWNER

    owned = getattr(cache, OWNED, None)
    if owned is None or owned[0] != owner or int(cache.get_seq_length()) > owned[1]:
        return
    for tensor in tensors:
        if getattr(tensor, KV_OWNER, None) != owner:  # a decode step's tensors are marked already
            setattr(tensor, KV_OWNER, owner)


def _mark_owned(cache, owner: str) -> None:
    if cache is not None and callable(getattr(cache, "get_seq_length", None)):
        setattr(cache, OWNED, (owner, int(cache.get_seq_length())))


def quarot_call(compiled: OptimizedModule, fn, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)`` (the compiled module's call or forward) with the promises of the
    module doc: packed cache, dynamic batch and sequence, the cache kept ours, and an error
    instead of the float model past the recompile limit."""
    config = compiled_options(compiled)
    if compiled not in _CHECKED:
        check_model(compiled._orig_mod, config)
        _CHECKED.add(compiled)
    kwargs = with_packed_cache(compiled, kwargs)
    owner = config.kv_signature()
    cache = _cache_in(kwargs)
    tensors = _cache_tensors(cache)
    if cache is not None:
        _claim(cache, owner, tensors)
    _mark_dynamic(args, kwargs, tensors)
    patches = _recompile_patches()
    try:
        with torch._dynamo.config.patch(**patches):
            outputs = fn(*args, **kwargs)
    except FailOnRecompileLimitHit as error:
        limit = patches.get("recompile_limit", torch._dynamo.config.recompile_limit)
        raise RecompileLimitError(
            f"quarot-fx: {type(compiled._orig_mod).__name__}'s forward has been compiled {limit} times "
            f"(torch._dynamo.config.recompile_limit = {limit}); past it Dynamo would run the original FLOAT model "
            "for this call, so quarot-fx stops instead. Raise torch._dynamo.config.recompile_limit (each graph "
            "of a quarot model is one compile), or call with fewer distinct input kinds (e.g. the same "
            "generation settings); TORCH_LOGS=recompiles shows why each graph was compiled.") from error
    _mark_owned(cache, owner)
    _mark_owned(getattr(outputs, "past_key_values", None), owner)
    return outputs


def quantized_generate(compiled: OptimizedModule, *args, **kwargs):
    """``compiled._orig_mod.generate(...)`` with every forward step through the compiled model."""
    proxy = copy.copy(compiled._orig_mod)  # shares _parameters, _buffers and _modules

    @functools.wraps(compiled._orig_mod.forward)  # generate() reads the forward's signature
    def forward(*a, **k):
        return quarot_call(compiled, compiled.forward, a, k)

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
            return quarot_call(self, functools.partial(call, self), args, kwargs)
        return call(self, *args, **kwargs)

    __getattr__._quarot_fx = True
    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule.__call__ = __call__
