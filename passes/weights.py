"""Weight edits recorded by the rotation passes, and their one-time materialization.

Passes do not touch tensors: they append edits to a site (a linear, addmm or embedding
node). ``materialize_weights`` then computes each edited weight once (float32, or float64 for float64 weights) and
stores it in a cache keyed by the *parameter* and the edit list, so a recompile (a new
sequence length, a new cache shape) reuses the transformed weights instead of redoing them.
Sites that share a parameter (tied embeddings) get separate constants: untied.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from quarot_fx.kernels import pack_linear_weight  # also registers torch.ops.quarot_fx
from quarot_fx.kernels.quantized_linear import simulated_linear

from .graph_utils import Site
from .matrices import Matrix, multiply_right


@dataclass(frozen=True)
class InputAffine:
    """The input arrives as n with x = n ⊙ scale + shift folded away: W·diag(scale), b + W·shift."""

    signature: str
    scale: torch.Tensor | None = field(compare=False, hash=False)
    shift: torch.Tensor | None = field(compare=False, hash=False)

    def apply(self, w, b):
        if self.shift is not None:
            shift = w @ self.shift.to(w)
            b = shift if b is None else b + shift
        if self.scale is not None:
            w = w * self.scale.to(w)[None, :]
        return w, b

    def describe(self) -> str:
        return "fold norm " + ("scale+shift" if self.shift is not None else "scale")


@dataclass(frozen=True)
class InputRotation:
    """The input arrives rotated, x̃ = x·M: W ← W·M."""

    matrix: Matrix

    def apply(self, w, b):
        return multiply_right(w, self.matrix), b

    def describe(self) -> str:
        return f"input × {self.matrix.describe()}"


@dataclass(frozen=True)
class OutputTransform:
    """Output rows [start, stop) are multiplied by M on the right: W ← Mᵀ·W, b ← Mᵀ·b."""

    matrix: Matrix
    start: int
    stop: int

    def apply(self, w, b):
        rows = slice(self.start, self.stop)
        w = w.clone()
        w[rows] = multiply_right(w[rows].T, self.matrix).T  # Mᵀ·W = (Wᵀ·M)ᵀ
        if b is not None:
            b = b.clone()
            b[rows] = multiply_right(b[rows], self.matrix)
        return w, b

    def describe(self) -> str:
        whole = self.start == 0
        rows = "" if whole else f" rows {self.start}:{self.stop}"
        return f"output{rows} × {self.matrix.describe()}"


@dataclass(frozen=True)
class ScaleOutputRows:
    """Output rows [start, start + len(scale)) divided by the scale (SmoothRot's producer side)."""

    signature: str
    scale: torch.Tensor = field(compare=False, hash=False)
    start: int = 0

    def apply(self, w, b):
        rows = slice(self.start, self.start + self.scale.numel())
        w = w.clone()
        w[rows] = (w[rows].double() / self.scale[:, None]).to(w.dtype)  # float64, then one rounding
        if b is not None:
            b = b.clone()
            b[rows] = (b[rows].double() / self.scale).to(b.dtype)
        return w, b

    def describe(self) -> str:
        return f"smoothrot ÷ s on rows {self.start}:{self.start + self.scale.numel()}"


@dataclass(frozen=True)
class ScaleInputColumns:
    """Input columns multiplied by the scale (SmoothRot's consumer side): W ← W·diag(s)."""

    signature: str
    scale: torch.Tensor = field(compare=False, hash=False)

    def apply(self, w, b):
        return (w.double() * self.scale[None, :]).to(w.dtype), b

    def describe(self) -> str:
        return "smoothrot × s on inputs"


@dataclass(frozen=True)
class PadOutput:
    """Zero output rows up to ``n`` (a residual writer in an expanded stream)."""

    n: int

    def apply(self, w, b):
        w = torch.nn.functional.pad(w, (0, 0, 0, self.n - w.shape[0]))
        return w, (None if b is None else torch.nn.functional.pad(b, (0, self.n - b.shape[0])))

    def describe(self) -> str:
        return f"pad output to {self.n}"


@dataclass(frozen=True)
class PadInput:
    """Zero columns up to ``n`` inputs (dimension expansion for a Hadamard of order n)."""

    n: int

    def apply(self, w, b):
        return torch.nn.functional.pad(w, (0, self.n - w.shape[1])), b

    def describe(self) -> str:
        return f"pad input to {self.n}"


class _WeightQuantizer:
    """A last edit that rounds the weight: ``codes`` gives int8 codes and group scales (what
    the integer kernels store, packed); ``apply`` gives their dequantized float form."""

    def apply(self, w, b):
        from quarot_fx.numerics.quant import dequantize_weight

        return dequantize_weight(*self.codes(w)).to(w.dtype), b


@dataclass(frozen=True)
class QuantizeWeight(_WeightQuantizer):
    """Last edit: symmetric RTN per output channel (or group), clip ratio searched per row."""

    bits: int
    group_size: int | None
    clip_search: bool

    def codes(self, w):
        from quarot_fx.numerics.quant import weight_codes_rtn

        return weight_codes_rtn(w, self.bits, self.group_size, self.clip_search)

    def describe(self) -> str:
        group = f" group {self.group_size}" if self.group_size else " per channel"
        return f"rtn w{self.bits}{group}" + (" (clip search)" if self.clip_search else "")


@dataclass(frozen=True)
class GPTQWeight(_WeightQuantizer):
    """Last edit from calibration: GPTQ, OBR, or RTN after a Wanda mask (``method``), with the
    Hessian of the (rotated) inputs; keyed by the calibration data. ``sparsity`` > 0 or an N:M
    ``pattern`` prunes with Wanda's mask first (numerics/sparse.py)."""

    bits: int
    group_size: int | None
    clip_search: bool
    damp: float
    block_size: int
    act_order: bool
    calibration: str  # fingerprint of the calibration tokens
    sequential: bool = False  # Hessians from inputs of the already-quantized earlier sites
    method: str = "gptq"  # "gptq" | "obr" | "rtn" (pruning only: the mask needs calibration)
    sparsity: float = 0.0
    pattern: str = "unstructured"
    hessian: torch.Tensor | None = field(default=None, compare=False, hash=False)
    solved: tuple | None = field(default=None, compare=False, hash=False)  # (codes, scales) already computed

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0

    def codes(self, w):
        from quarot_fx.numerics import sparse
        from quarot_fx.numerics.gptq import gptq_codes
        from quarot_fx.numerics.quant import weight_codes_rtn

        if self.solved is not None:
            return self.solved
        if self.hessian is None:
            raise RuntimeError(f"{self.method} edit has no Hessian and its result is not cached")
        args = (self.bits, self.group_size, self.clip_search, self.damp, self.block_size)
        keep = (sparse.wanda_mask(w, torch.diag(self.hessian).clamp(min=0).sqrt(), self.sparsity, self.pattern)
                if self.prunes else torch.ones_like(w, dtype=torch.bool))
        if self.method == "obr":
            return sparse.obr_codes(w, self.hessian, keep, *args)
        if self.method == "rtn":
            codes, scales = weight_codes_rtn(w * keep, self.bits, self.group_size, self.clip_search)
            return codes * keep, scales
        if self.prunes:
            return sparse.masked_gptq_codes(w, self.hessian, keep, *args)
        return gptq_codes(w, self.hessian, *args, self.act_order)

    def describe(self) -> str:
        group = f" group {self.group_size}" if self.group_size else " per channel"
        pruned = ""
        if self.prunes:
            pruned = f" {self.pattern}" if self.pattern != "unstructured" else f" {self.sparsity:.0%} unstructured"
            pruned += " (Wanda mask)"
        return (f"{self.method} w{self.bits}{group}{pruned}" + (" act-order" if self.act_order else "")
                + (" sequential" if self.sequential else ""))


Edit = (InputAffine | InputRotation | OutputTransform | ScaleOutputRows | ScaleInputColumns | PadInput | PadOutput
        | QuantizeWeight | GPTQWeight)


def weight_record(fqn: str, edit: _WeightQuantizer):
    """The report's record of a weight quantization (simulated until the lowering packs it)."""
    from quarot_fx.report import QuantRecord

    method = edit.method if isinstance(edit, GPTQWeight) else "rtn"
    if isinstance(edit, GPTQWeight) and edit.prunes:
        method += f" + Wanda {edit.pattern if edit.pattern != 'unstructured' else f'{edit.sparsity:.0%}'}"
    return QuantRecord(fqn, "weight", edit.bits, method, "search" if edit.clip_search else None)


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


@dataclass
class SiteEdits:
    site: Site
    original_weight: str = ""  # attribute of the weight before any edit (for reports)
    edits: list = field(default_factory=list)
    online: list[str] = field(default_factory=list)  # descriptions of online transforms on its input


PACKED = "packed int4"  # cache-key suffix of a packed (rather than float) result


def weight_key(gm: fx.GraphModule, entry: SiteEdits, originals, fqn_of, extra: tuple = ()) -> tuple:
    """(parameter, cache key) of a site's weight after its edits and then ``extra``."""
    site = entry.site
    w_attr = site.weight_node.target
    b_node = site.bias_node
    b_attr = b_node.target if b_node is not None else None
    weight = originals.get(w_attr, getattr(gm, w_attr))
    bias = originals.get(b_attr, getattr(gm, b_attr)) if b_attr else None
    edits = tuple(entry.edits) + tuple(extra)
    return weight, (site.kind, fqn_of(w_attr), weight._version, fqn_of(b_attr) if b_attr else None,
                    bias._version if bias is not None else None, edits, weight.dtype)


def is_cached(gm: fx.GraphModule, entry: SiteEdits, originals, fqn_of, extra: tuple = (), packed: bool = False) -> bool:
    """The site's weight after its edits and ``extra`` is cached in the form materialization will
    ask for (packed for the integer kernels, else float): the other form needs the edit's inputs."""
    return WEIGHT_CACHE.has(*weight_key(gm, entry, originals, fqn_of, extra + ((PACKED,) if packed else ())))


def _site_tensors(gm: fx.GraphModule, entry: SiteEdits, originals, fqn_of, extra: tuple = ()):
    """(weight, bias, cache key) of a site's pre-edit tensors."""
    b_node = entry.site.bias_node
    weight, key = weight_key(gm, entry, originals, fqn_of, extra)
    bias = originals.get(b_node.target, getattr(gm, b_node.target)) if b_node is not None else None
    return weight, bias, key


def _edited(entry: SiteEdits, weight, bias, edits) -> tuple:
    """Logical [out, in] weight and bias after ``edits``, in float32 (float64 for float64 weights:
    float32 is accurate enough for orthonormal edits and ~7x faster than float64 on CPU)."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = entry.site.to_logical(weight.detach()).to(work)
    b = bias.detach().to(work) if bias is not None else None
    for edit in edits:
        w, b = edit.apply(w, b)
    return w, (None if b is None else b.to(bias.dtype if bias is not None else weight.dtype))


def edited_logical_weight(gm: fx.GraphModule, entry: SiteEdits, originals) -> tuple[torch.Tensor, torch.dtype]:
    """(logical [out, in] float32 weight after the site's edits so far, the stored dtype)."""
    weight = originals.get(entry.site.weight_node.target, getattr(gm, entry.site.weight_node.target))
    w, _ = _edited(entry, weight, None, entry.edits)
    return w, weight.dtype


def transformed_weights(gm: fx.GraphModule, entry: SiteEdits, originals, fqn_of) -> tuple:
    """(weight, bias) after the site's edits, in the stored layout and dtype, via the cache."""
    weight, bias, key = _site_tensors(gm, entry, originals, fqn_of)

    def compute():
        w, b = _edited(entry, weight, bias, entry.edits)
        return entry.site.from_logical(w.to(weight.dtype)), b

    return WEIGHT_CACHE.get(weight, key, compute)


def quantizes_last(entry: SiteEdits) -> bool:
    return bool(entry.edits) and isinstance(entry.edits[-1], _WeightQuantizer)


def packed_weights(gm: fx.GraphModule, entry: SiteEdits, originals, fqn_of) -> tuple:
    """(int4 bytes [out, ceil(in/2)], float32 scales [out, groups], bias, in) of a site whose last
    edit quantizes to 4 bits; cached like :func:`transformed_weights`, so packing runs once."""
    weight, bias, key = _site_tensors(gm, entry, originals, fqn_of, extra=(PACKED,))

    def compute():
        w, b = _edited(entry, weight, bias, entry.edits[:-1])
        codes, scales = entry.edits[-1].codes(w)
        return pack_linear_weight(codes, scales.shape[1]), scales.float().contiguous(), b, codes.shape[1]

    return WEIGHT_CACHE.get(weight, key, compute)


def deferred_codes(gm: fx.GraphModule, entry: SiteEdits, originals, fqn_of):
    """A call that gives (codes, scales) of a site whose last edit quantizes, computed only when
    asked (export): a solved GPTQ/OBR edit has them; RTN recomputes them from the pre-edit tensors."""
    last = entry.edits[-1]
    if getattr(last, "solved", None) is not None:
        solved = last.solved
        return lambda: solved
    weight, bias, key = _site_tensors(gm, entry, originals, fqn_of, extra=("codes",))
    edits = tuple(entry.edits[:-1])

    def compute():
        w, _ = _edited(entry, weight, bias, edits)
        return last.codes(w)

    return lambda: WEIGHT_CACHE.get(weight, key, compute)


def record_final_weight(ctx, module: str, entry: SiteEdits, weight=None, bias=None, codes=None) -> None:
    """Record the site's :class:`FinalWeight` in the report (bits and group from its quantizing
    edit, if any); a later phase's record of the same op replaces the earlier one."""
    from quarot_fx.report import FinalWeight

    last = entry.edits[-1] if quantizes_last(entry) else None
    earlier = ctx.report.final_weights.get(module)
    param = ctx.lifted.originals.get(entry.original_weight, earlier.param if earlier is not None else None)
    ctx.report.final_weights[module] = FinalWeight(
        module, entry.site.kind, ctx.fqn_of(entry.original_weight), param, weight, bias, getattr(last, "bits", None),
        getattr(last, "group_size", None), codes if last is not None else None)


def _constant(gm: fx.GraphModule, before: fx.Node, name: str, tensor: torch.Tensor) -> fx.Node:
    """Register ``tensor`` as a buffer of gm and read it just before ``before``."""
    gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["example_value"] = tensor
    return node


def replace_site_weights(gm: fx.GraphModule, entry: SiteEdits, weight, bias) -> None:
    """Point the site's node at new constants (own buffers: tied weights become untied)."""
    node = entry.site.node
    prefix = f"qfx_edited__{node.name}"
    w_node = _constant(gm, node, prefix + "__weight", weight)
    args = list(node.args)
    kind = entry.site.kind
    args[{"linear": 1, "addmm": 2, "embedding": 1}[kind]] = w_node
    if bias is not None:
        b_node = _constant(gm, node, prefix + "__bias", bias)
        if kind == "addmm":
            args[0] = b_node
        elif len(args) > 2:
            args[2] = b_node
        elif "bias" in node.kwargs:
            node.kwargs = {**node.kwargs, "bias": b_node}
        else:
            args.append(b_node)
    node.args = tuple(args)


QUANTIZED_LINEAR = torch.ops.quarot_fx.quantized_linear.default
SPARSE_QUANTIZED_LINEAR = torch.ops.quarot_fx.sparse_quantized_linear.default
INTEGER_LINEARS = (QUANTIZED_LINEAR, SPARSE_QUANTIZED_LINEAR)


def integer_linear_shape(node: fx.Node) -> tuple[int, int, int]:
    """(in_features, out_features, groups) of a ``quantized_linear`` / ``sparse_quantized_linear`` node."""
    scale = node.args[3] if node.target is QUANTIZED_LINEAR else node.args[4]
    in_features = node.args[5] if node.target is QUANTIZED_LINEAR else node.args[6]
    out_features, groups = scale.meta["example_value"].shape
    return in_features, out_features, groups


def _swap_site(gm: fx.GraphModule, entry: SiteEdits, prefix: str, tensors: dict, target, args) -> fx.Node:
    """Replace a linear/addmm site by ``target(input, None, *constants, *args(out_dtype))``, the
    constants being ``tensors`` (None stays None); the None is the activation scale the lowering
    fills in when it hands the call integer codes."""
    node = entry.site.node
    constants = [_constant(gm, node, f"{prefix}__{node.name}__{name}", t) if t is not None else None
                 for name, t in tensors.items()]
    out = node.meta.get("example_value")
    dtype = out.dtype if isinstance(out, torch.Tensor) else entry.site.weight_node.meta["example_value"].dtype
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, (entry.site.input_node, None, *constants, *args(dtype)))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def replace_with_quantized_linear(gm: fx.GraphModule, entry: SiteEdits, weights: dict, scales, bias,
                                  in_features: int, extra: tuple = (), gemm: str = "auto",
                                  keep_unpacked: bool = False) -> fx.Node:
    """Swap a linear/addmm site for ``quantized_linear`` (``weights`` = {"weight": packed}) or
    ``sparse_quantized_linear`` ({"values": …, "meta": …}, ``extra`` = (format, kept)) on
    constants (float input for now: the lowering then hands it integer codes)."""
    target = QUANTIZED_LINEAR if "weight" in weights else SPARSE_QUANTIZED_LINEAR
    return _swap_site(gm, entry, "qfx_packed", {**weights, "scale": scales, "bias": bias}, target,
                      lambda dtype: (in_features, dtype, *extra, gemm, keep_unpacked))


def replace_with_simulated_linear(gm: fx.GraphModule, entry: SiteEdits, codes, scales, bias) -> fx.Node:
    """Swap a linear/addmm site for ``simulated_linear`` on float weight codes and scales (float
    input for now: the fake lowering then hands it the activation codes)."""
    return _swap_site(gm, entry, "qfx_codes", {"weight": codes, "scale": scales, "bias": bias}, simulated_linear,
                      lambda dtype: (dtype,))


def side_effects(node: fx.Node) -> bool:
    """FX's purity test plus in-place methods (``buf.add_(1)``), which it does not know."""
    if node.is_impure():
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes and buffers nothing uses any more (the pre-edit weights)."""
    gm.graph.eliminate_dead_code(is_impure_node=side_effects)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in gm.named_buffers(recurse=False) if name not in used]:
        delattr(gm, name)
