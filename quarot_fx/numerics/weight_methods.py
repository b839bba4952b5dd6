"""Weight methods by name: how a quantized linear's weight becomes codes and scales.

The ``weights`` option names one (``"rtn"``, ``"gptq"``, ``"obr"``, or one added with
:func:`register_weight_method`); option validation, the CLI's choices and whether calibration
runs (Hessians of the rotated inputs, then the method per linear) are derived from the registry.
A method's ``codes(w, hessian, keep, settings)`` gets the logical [out, in] float weight (rotated,
norm-folded), the Hessian of its input (None for a method without calibration), the boolean mask
of weights to keep (None when no sparsity option prunes) and ``settings`` (``bits``,
``group_size``, ``clip_search``, ``damp``, ``block_size``, ``act_order``), and returns int8 codes
[out, in] and float scales [out, groups].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import sparse
from .gptq import gptq_codes
from .quant import weight_codes_rtn

Codes = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, object], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class WeightMethod:
    name: str
    codes: Codes
    needs_calibration: bool  # it reads the Hessian of its input (calibration data required)
    act_order: bool = False  # it honours gptq_act_order


_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str, codes: Codes, *, needs_calibration: bool = True,
                           act_order: bool = False) -> WeightMethod:
    """Make ``weights=name`` available everywhere (options, CLI, calibration); see the module doc."""
    if not isinstance(name, str) or not name or name in _METHODS:
        raise ValueError(f"weight method name must be a new non-empty string; got {name!r} "
                         f"(registered: {', '.join(_METHODS)})")
    method = WeightMethod(name, codes, needs_calibration, act_order)
    _METHODS[name] = method
    return method


def unregister_weight_method(name: str) -> None:
    if name in ("rtn", "gptq", "obr"):
        raise ValueError(f"{name!r} is built in")
    _METHODS.pop(name, None)


def weight_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def weight_method(name: str) -> WeightMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"weights must be one of {', '.join(map(repr, _METHODS))}; got {name!r}") from None


def _rtn(w, hessian, keep, s):
    if keep is None:
        return weight_codes_rtn(w, s.bits, s.group_size, s.clip_search)
    codes, scales = weight_codes_rtn(w * keep, s.bits, s.group_size, s.clip_search)
    return codes * keep, scales


def _gptq(w, hessian, keep, s):
    args = (s.bits, s.group_size, s.clip_search, s.damp, s.block_size)
    if keep is not None:  # Wanda's mask, then GPTQ with the pruned weights held at zero (SparseGPT-style)
        return sparse.masked_gptq_codes(w, hessian, keep, *args)
    return gptq_codes(w, hessian, *args, s.act_order)


def _obr(w, hessian, keep, s):
    keep = torch.ones_like(w, dtype=torch.bool) if keep is None else keep
    return sparse.obr_codes(w, hessian, keep, s.bits, s.group_size, s.clip_search, s.damp, s.block_size)


register_weight_method("rtn", _rtn, needs_calibration=False)
register_weight_method("gptq", _gptq, act_order=True)
register_weight_method("obr", _obr)
