"""``generate()`` on a quarot-compiled model runs the compiled forward, not the eager one.

``torch.compile(model)`` returns an ``OptimizedModule`` whose compiled part is its own
``__call__``; any other attribute, ``generate`` included, is looked up on the original model,
whose ``generate`` then calls the original (float) forward: the backend would never run.
For modules compiled with ``backend="quarot"`` this module routes ``generate`` through a
shallow copy of the model whose ``forward`` is the compiled call. The copy shares every
parameter and buffer; the user's model is not modified.

The routing is installed on ``OptimizedModule.__getattr__`` when quarot-fx is imported (which
``torch.compile(..., backend="quarot")`` does when it resolves the backend) and changes nothing
for modules compiled with other backends.
"""

from __future__ import annotations

import copy
import functools

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


def quantized_generate(compiled: OptimizedModule, *args, **kwargs):
    """``compiled._orig_mod.generate(...)`` with every forward step through the compiled model."""
    proxy = copy.copy(compiled._orig_mod)  # shares _parameters, _buffers and _modules
    proxy.forward = compiled.forward  # the compiled __call__ of the original model
    return proxy.generate(*args, **kwargs)


def install() -> None:
    """Make ``generate`` on quarot-compiled modules quantized (idempotent)."""
    original = OptimizedModule.__getattr__
    if getattr(original, "_quarot_fx", False):
        return

    def __getattr__(self, name):
        attribute = original(self, name)
        if name == "generate" and compiled_with_quarot(self):
            return functools.partial(quantized_generate, self)
        return attribute

    __getattr__._quarot_fx = True
    OptimizedModule.__getattr__ = __getattr__
