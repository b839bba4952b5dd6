"""The one owner of weight state: every pass reads and produces weights through ``ctx.weights``.

A :class:`WeightStore` holds the compile's original parameters and their names, and answers for a
site (its :class:`~quarot_fx.passes.edits.SiteEdits`) the float weight after its edits, the packed
4-bit form, the codes, or anything else a pass wants kept with a parameter (``memo``). Results
live in one process-wide :class:`WeightCache` keyed by the *parameter* and what was asked (the
edit list and one of the forms below), so a recompile (a new batch size, a new cache kind) and a
second model of the same class reuse the work, and nothing survives its parameter.
"""

from __future__ import annotations

import weakref

import torch
import torch.fx as fx

from quarot_fx.kernels import pack_linear_weight  # also registers torch.ops.quarot_fx

from .edits import QuantizeWeight, SiteEdits

# The forms a site's weight is cached in, beyond the float result (cache-key suffixes, one place).
PACKED = "packed int4"  # (int4 bytes, scales, bias, in_features), what the integer kernels hold
CODES = "codes"  # (int8 codes, scales), computed only when asked (export)
OFFLINE = "without online rotations"  # codes for an export that leaves R2's online part and R4 out
CALIBRATED_CODES = "calibrated codes"  # GPTQ/OBR's solved (codes, scales), kept for quarot_fx.save
CHANNEL_MAX = "smoothrot channel max"  # SmoothRot's calibration statistic of a down-projection


class WeightCache:
    """Transformed weights by (parameter identity, edit list): survives recompiles, not the parameter."""

    def __init__(self):
        self._by_param: dict[int, tuple[weakref.ref, dict]] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._by_param.clear()

    def has(self, param: torch.Tensor, key) -> bool:
        entry = self._by_param.get(id(param))
        return entry is not None and entry[0]() is param and key in entry[1]

    def get(self, param: torch.Tensor, key, compute):
        pid = id(param)
        entry = self._by_param.get(pid)
        if entry is None or entry[0]() is not param:
            ref = weakref.ref(param, lambda _r, pid=pid: self._by_param.pop(pid, None))
            entry = (ref, {})
            self._by_param[pid] = entry
        results = entry[1]
        if key in results:
            self.hits += 1
        else:
            self.misses += 1
            results[key] = compute()
        return results[key]


WEIGHT_CACHE = WeightCache()




class WeightStore:
    """A compile's weights: the original parameters (``originals``, by graph attribute) and their
    names, behind the cache. ``float``, ``packed``, ``codes`` and ``edited`` give a site's weight
    in each form; ``memo`` keeps anything else with a parameter."""

    def __init__(self, gm: fx.GraphModule, originals: dict, fqn_of):
        self.gm, self.originals, self.fqn_of = gm, originals, fqn_of
        self.cache = WEIGHT_CACHE

    def tensor(self, attr: str) -> torch.Tensor:
        """The original parameter behind a graph attribute (or the graph's own constant)."""
        return self.originals.get(attr, getattr(self.gm, attr))

    def key(self, entry: SiteEdits, extra: tuple = ()) -> tuple:
        """(parameter, cache key) of a site's weight after its edits and then ``extra``."""
        site = entry.site
        w_attr = site.weight_node.target
        b_attr = site.bias_node.target if site.bias_node is not None else None
        weight = self.tensor(w_attr)
        bias = self.tensor(b_attr) if b_attr else None
        edits = tuple(entry.edits) + tuple(extra)
        return weight, (site.kind, self.fqn_of(w_attr), weight._version, self.fqn_of(b_attr) if b_attr else None,
                        bias._version if bias is not None else None, edits, weight.dtype)

    def has(self, entry: SiteEdits, extra: tuple = (), packed: bool = False) -> bool:
        """The site's weight after its edits and ``extra`` is cached in the form materialization will
        ask for (packed for the integer kernels, else float): the other form needs the edit's inputs."""
        return self.cache.has(*self.key(entry, extra + ((PACKED,) if packed else ())))

    def memo(self, param: torch.Tensor, key, compute):
        """``compute()`` once per (parameter, key); None ``compute`` asks for what is kept."""
        return self.cache.get(param, key, compute)

    def has_memo(self, param: torch.Tensor, key) -> bool:
        return self.cache.has(param, key)

    def _tensors(self, entry: SiteEdits, extra: tuple = ()):
        weight, key = self.key(entry, extra)
        b_node = entry.site.bias_node
        return weight, (self.tensor(b_node.target) if b_node is not None else None), key

    def edited(self, entry: SiteEdits) -> tuple[torch.Tensor, torch.dtype]:
        """(logical [out, in] float32 weight after the site's edits so far, the stored dtype)."""
        weight = self.tensor(entry.site.weight_node.target)
        return apply_edits(entry, weight, None, entry.edits)[0], weight.dtype

    def float(self, entry: SiteEdits) -> tuple:
        """(weight, bias) after the site's edits, in the stored layout and dtype."""
        weight, bias, key = self._tensors(entry)

        def compute():
            w, b = apply_edits(entry, weight, bias, entry.edits)
            return entry.site.from_logical(w.to(weight.dtype)), b

        return self.memo(weight, key, compute)

    def packed(self, entry: SiteEdits) -> tuple:
        """(int4 bytes [out, ceil(in/2)], float32 scales [out, groups], bias, in) of a site whose
        last edit quantizes to 4 bits: packing runs once."""
        weight, bias, key = self._tensors(entry, extra=(PACKED,))

        def compute():
            w, b = apply_edits(entry, weight, bias, entry.edits[:-1])
            codes, scales = entry.edits[-1].codes(w)
            return pack_linear_weight(codes, scales.shape[1]), scales.float().contiguous(), b, codes.shape[1]

        return self.memo(weight, key, compute)

    def codes(self, entry: SiteEdits):
        """A call that gives (codes, scales) of a site whose last edit quantizes, computed only when
        asked (export): a solved GPTQ/OBR edit has them; RTN recomputes them from the pre-edit tensors."""
        last = entry.edits[-1]
        if getattr(last, "solved", None) is not None:
            solved = last.solved
            return lambda: solved
        return self._codes_after(entry, tuple(entry.edits[:-1]), (CODES,))

    def _codes_after(self, entry: SiteEdits, edits: tuple, extra: tuple):
        """A call giving the last edit's (codes, scales) of the weight after ``edits``, computed once."""
        weight, bias, key = self._tensors(entry, extra=extra)

        def compute():
            w, _ = apply_edits(entry, weight, bias, edits)
            return entry.edits[-1].codes(w)

        return lambda: self.memo(weight, key, compute)

    def offline_codes(self, entry: SiteEdits):
        """A call that gives (codes, scales) of the site's weight quantized *without* its online input
        rotations (an export for engines that apply none), or None where that weight cannot be
        re-derived: no online edit is in this list (an earlier phase folded it), or a calibrated
        method solved the codes in the rotated basis (its Hessian belongs to that basis)."""
        last = entry.edits[-1] if entry.edits else None
        online = [edit for edit in entry.edits[:-1] if getattr(edit, "online", False)]
        if not online or not isinstance(last, QuantizeWeight):
            return None
        offline = tuple(edit for edit in entry.edits[:-1] if not getattr(edit, "online", False))
        return self._codes_after(entry, offline, (CODES, OFFLINE))


def apply_edits(entry: SiteEdits, weight, bias, edits) -> tuple:
    """Logical [out, in] weight and bias after ``edits``, in float32 (float64 for float64 weights:
    float32 is accurate enough for orthonormal edits and ~7x faster than float64 on CPU)."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = entry.site.to_logical(weight.detach()).to(work)
    b = bias.detach().to(work) if bias is not None else None
    for edit in edits:
        w, b = edit.apply(w, b)
    return w, (None if b is None else b.to(bias.dtype if bias is not None else weight.dtype))
