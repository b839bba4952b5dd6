"""``QuaRotConfig``: every option of the backend, validated in one place.

``torch.compile(model, backend="quarot", options={...})`` builds one of these with
:meth:`QuaRotConfig.from_options`; the same object can be made directly and passed as
``options=cfg.to_options()`` or to :func:`quarot_fx.compile`. A preset fills the bit
widths; keys given next to it override the preset's values.
"""

from __future__ import annotations

import os

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .calibrated import Calibrated, fingerprint
from .numerics.weight_methods import weight_method, weight_methods
from .numerics.rotations import GSR_PERMUTATIONS, ROTATION_KINDS, rotation_kinds
from .numerics.sparse import parse_pattern, pattern_sparsity

PRESETS: dict[str, dict[str, int]] = {
    "w4a4kv4": {"w_bits": 4, "a_bits": 4, "kv_bits": 4},
    "w8a8kv8": {"w_bits": 8, "a_bits": 8, "kv_bits": 8},
    "w6a6kv6": {"w_bits": 6, "a_bits": 6, "kv_bits": 6},
    "w3a3kv3": {"w_bits": 3, "a_bits": 3, "kv_bits": 3},
    "w4a16": {"w_bits": 4, "a_bits": 16, "kv_bits": 16},
    "fp": {"w_bits": 16, "a_bits": 16, "kv_bits": 16},
}
BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # 16 means "not quantized"
LOWERINGS = ("inductor", "fx")
WRAPPERS = ("python", "cpp")
PREFILL_ATTENTIONS = ("float", "int8")
HEAD_MODES = ("auto", "int8", "w8a8")  # quantize_lm_head's strings (besides True and False)
KERNELS = ("integer", "fake")
GEMM_ENVIRONMENT = "QUAROT_FX_INT_GEMM"  # the policy when the option is "auto"


def gemm_policies() -> tuple[str, ...]:
    """The ``int_gemm`` values: "auto" or a CPU GEMM candidate registered in ``kernels/gemm.py``."""
    from .kernels.gemm import gemm_policies as registered  # lazy: the kernels read config at import

    return registered()


def gemm_environment() -> str:
    """``$QUAROT_FX_INT_GEMM`` ("auto" when unset), refused by name when it is no policy."""
    value = os.environ.get(GEMM_ENVIRONMENT, "auto")
    policies = gemm_policies()
    if value not in policies:
        raise ValueError(f"the environment variable {GEMM_ENVIRONMENT}={value!r} is not a GEMM policy; set it to one "
                         f"of {', '.join(policies)} or unset it")
    return value
RESIDENT_WEIGHTS = ("packed", "unpacked")
KV_CACHES = ("packed", "float")
GBS_OBJECTIVES = ("loss", "local", "fisher")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _integer(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")


@dataclass(frozen=True)
class QuaRotConfig:
    """Options of the quarot backend. Unknown keys and bad values raise ``ValueError``.

    Attributes:
        preset: ``"w4a4kv4"``, ``"w8a8kv8"``, ``"w6a6kv6"``, ``"w3a3kv3"``, ``"w4a16"``, ``"fp"`` (rotate only) or None.
        rotation: residual-stream rotation (R1): ``"hadamard"``, ``"randomized_hadamard"``,
            ``"gsr"``, ``"random"``, any kind added with ``quarot_fx.register_rotation``, or
            ``"none"`` (no rotation at all).
        r2_rotation, r3_rotation, r4_rotation: the registered kind R2 (value → output, per head
            and across heads), R3 (query/key) and R4 (down-projection input) use; ``"hadamard"``
            by default, whose online transforms are fused with quantization.
        w_bits, a_bits, kv_bits: 2..8, or 16 for "not quantized".
        seed: seed of the randomized rotations.
        gsr_group_size: Walsh block size for ``rotation="gsr"`` (power of two; None = largest
            power of two ≤ 128 dividing the hidden size).
        gsr_permutation: ``"sequency"`` (GSR's Walsh blocks, default) or ``"none"`` (Sylvester
            blocks: plain block Hadamard, GSR's baseline). The Walsh matrix is symmetric, so there
            is no side to choose (see ``numerics.rotations.gsr_rotation``). Applies to every gsr
            rotation (R1, and R4 with ``r4_rotation="gsr"``).
        r1, r2, r3, r4: switch each rotation site on or off (residual, value→output,
            query/key, down-projection input); ignored when ``rotation="none"``. ``r3=None``
            (default): R3 only when the keys are quantized (``kv_bits < 16``): without a KV
            quantizer behind it, it is an online cost that buys nothing.
        lowering: ``"inductor"`` (compile with Inductor, freezing on) or ``"fx"`` (run the
            rewritten FX graph as it is: fast to start, for tests and debugging).
        wrapper: the code that calls an Inductor graph's kernels: ``"python"`` (Inductor's
            default) or ``"cpp"`` (Inductor's C++ wrapper, ``cpp_wrapper``: the kernels and the
            quarot_fx ops are called from compiled C++, which takes a decode step's ~1000 calls
            out of the Python interpreter; the same numbers, a longer first compile). Needs
            ``lowering="inductor"``.
        prefill_attention: ``"float"`` (default: attention over the packed KV cache computes in
            float32, as over a float cache) or ``"int8"`` (a prefill's Q·Kᵀ multiplies int8
            queries, rounded per row, with the 4-bit key codes in integers on a CPU with AVX2:
            faster, not the same numbers; decode steps stay float). ``"int8"`` needs
            ``kv_bits ≤ 4`` and ``kv_cache="packed"``.
        weights: ``"rtn"`` (round to nearest), ``"gptq"`` or ``"obr"`` (optimal brain restoration:
            pruning and 4-bit quantization solved together; both need ``calibration``).
        sparsity, sparsity_pattern: fraction of each quantized linear's weights set to zero
            (0 ≤ s < 1), ``"unstructured"`` (exactly ⌊s·in⌋ per row) or ``"N:M"`` (N kept of every M
            inputs, e.g. ``"2:4"``; fixes s = 1 − N/M). The mask is Wanda's (|W|·‖x‖, needs
            ``calibration``); then ``rtn`` rounds, ``gptq`` compensates with pruned weights held
            at zero (SparseGPT-style), ``obr`` as in its paper.
        calibration: token-id tensors for GPTQ (see ``quarot_fx.tools.evaluate.calibration_windows``).
        gptq_damp, gptq_block_size, gptq_act_order: GPTQ's damping (fraction of mean diag H),
            column block and activation ordering.
        gptq_sequential: each linear's Hessian from inputs produced by the already-quantized
            earlier linears, with activation and KV quantization as configured (GPTQ/QuaRot
            papers); False: all Hessians in one pass over the rotated float graph.
        w_group_size: weight quantization group along the input dim (None = per output channel).
        w_clip_search: per-row clip ratio search minimizing the weight reconstruction error.
        a_clip, kv_clip: activation / KV clip ratios (None = 0.9 / 0.95 at ≤ 4 bits, else 1.0), or
            ``"gbs"``: searched per quantized input by gradual binary search (needs ``calibration``).
        expand: extra residual dimensions (dimension expansion): R1 works at width d + expand,
            rounded up to an order the rotation kind can build; a width without one is expanded
            automatically. Zero-padded writers and readers, norms still divide by d: exact.
        gbs_objective, gbs_windows, gbs_iterations: the search's objective (``"loss"``: the rest
            of the network's cross-entropy; ``"local"``: error of the first linear outputs the
            site reaches; ``"fisher"``: the quantization error weighted by the squared gradient of
            the loss at the site, from one backward pass), how many calibration windows it uses,
            and its halving steps. Defaults: ``"local"`` on 2 windows, which finishes in about 6.5
            minutes for SmolLM2-135M on 2 cores within 2 % of 4 windows' perplexity; ``"loss"``
            takes hours there, ``"fisher"`` about 3 minutes for a 3 % worse gap.
        gbs_tokens: the local objective on this many token positions per window (a fixed random
            subset) at activation sites, whose first linears act on each token alone, so the error
            is a sum over tokens and a subset estimates it; None: every token. K/V sites, whose
            error passes through attention, always use every token.
        quantize_lm_head: the output head (found structurally: the linear whose output is
            returned), whenever the config quantizes weights (``w_bits < 16``). ``"int8"``: int8
            weights per output channel, float activations: its decode GEMV reads a quarter of the
            float32 bytes, for +0.13 % (W8A8KV8) to +0.24 % (W4A4KV4) perplexity; ``"w8a8"``: the
            same weights and the activations rounded to int8 per row at run time, so the sums are
            integers (on a Zen 4 with AVX512-VNNI the head's decode GEMV 1.6 → 0.86 ms, a decode step
            6.7 % faster, for a further +0.02 % (W8A8KV8) to +0.04 % (W4A4KV4) perplexity; ``export``
            writes the weights, not the activations' rounding); ``"auto"`` (default): ``"w8a8"``
            where activations are quantized (``a_bits < 16``), ``"int8"`` in weight-only configs;
            ``True``: like every other linear (``w_bits``/``a_bits``); ``False``: kept in float.
        smoothrot, smoothrot_alpha: SmoothRot channel scaling of the MLP down-projection input
            before R4 (needs ``calibration``); s_j = max|x_j|^α / max|W_j|^(1-α); α = 0.6 won
            the sweep on held-out calibration text (SmolLM2-135M, W4A4KV4).
        kernels: ``"integer"`` (4-bit weights stored packed two per byte with their scales,
            activations and KV quantized to integer codes by ``quarot_fx::`` custom ops; CUDA
            runs Triton) or ``"fake"`` (plain torch ops on any device: a W4 linear with
            quantized inputs multiplies integer-valued float codes, exactly, then applies the
            scales in the integer kernels' order, so both paths give the same bits; elsewhere
            quantize, dequantize and use float matmuls). Weights of other widths than 4 bits
            stay simulated under ``"integer"``; the report says so.
        int_gemm: the CPU's exact integer GEMM: ``"auto"`` (time a real int8 GEMM against float32
            emulation once per shape and keep the faster: it depends on the CPU; the C int4
            kernels over the packed weight, a GEMV at 1..16 rows and a GEMM beyond, compete too), ``"int8"``, ``"float"`` or
            ``"int4"`` (where it applies); all give the same bits.
            ``"auto"`` defers to ``QUAROT_FX_INT_GEMM``.
        observe_inputs: diagnostics: record max |x| at every quantized linear's input after the
            rewrite, on the first calibration window (``report.input_max``; ``quarot-fx outliers``).
        resident_weights: ``"packed"`` (unpack the int4 weights on every call: least memory) or
            ``"unpacked"`` (unpack once and keep the GEMM-ready codes too: 4 bytes per weight
            more, no unpacking per call of the float emulation; shapes that take the C int4
            kernels read the packed bytes and keep nothing).
        kv_cache: the cache a call with ``use_cache`` and no (or an empty transformers) cache gets
            when ``kv_bits < 16``: ``"packed"`` (a :class:`quarot_fx.PackedKVCache` of codes,
            0.29× an fp16 cache at 4 bits and head_dim 64) or ``"float"`` (transformers' own
            cache holding the dequantized values: same numbers, no per-step dequantization of the
            whole cache, fp32 memory).
        learn_rotations, learn_steps, learn_lr, learn_windows, learn_tokens: learn R1 and every
            layer's per-head R2 (SpinQuant's Cayley SGD on the orthogonal group, initialised from the
            configured rotations) on the cross-entropy of the quantized network (activations, KV
            cache and RTN weights fake-quantized, gradients passed straight through the rounding;
            weights in float when GPTQ/OBR quantize them afterwards) over ``learn_windows``
            calibration windows of ``learn_tokens`` tokens (None: the compiled length; a graph
            compiled for one length always uses that length), ``learn_steps`` steps at learning rate
            ``learn_lr`` decayed linearly to 0. Needs ``calibration``; ``quarot_fx.save`` keeps the
            learned matrices, so ``load`` does not learn again.
    """

    preset: str | None = None
    rotation: str = "hadamard"
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    seed: int = 0
    gsr_group_size: int | None = None
    gsr_permutation: str = "sequency"
    r1: bool = True
    r2: bool = True
    r3: bool | None = None  # None: only where keys are quantized (kv_bits < 16), see applies_r3
    r4: bool = True
    r2_rotation: str = "hadamard"
    r3_rotation: str = "hadamard"
    r4_rotation: str = "hadamard"
    lowering: str = "inductor"
    wrapper: str = "python"
    prefill_attention: str = "float"
    weights: str = "rtn"
    w_group_size: int | None = None
    w_clip_search: bool = True
    a_clip: float | None = None
    kv_clip: float | None = None
    quantize_lm_head: bool | str = "auto"
    calibration: tuple | list | None = field(default=None, compare=False, repr=False)
    calibrated: Any = field(default=None, compare=False, repr=False)  # quarot_fx.calibrated.Calibrated (load)
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = False
    gptq_sequential: bool = True
    kernels: str = "integer"
    int_gemm: str = "auto"
    resident_weights: str = "packed"
    kv_cache: str = "packed"
    smoothrot: bool = False
    smoothrot_alpha: float = 0.6  # the best of a sweep on held-out calibration text (README)
    expand: int = 0
    sparsity: float = 0.0
    sparsity_pattern: str = "unstructured"
    observe_inputs: bool = False
    gbs_objective: str = "local"  # "loss" takes hours for SmolLM2-135M on 2 cores; local on 2 windows 6.4 min
    gbs_windows: int = 2
    gbs_iterations: int = 8
    gbs_tokens: int | None = None
    learn_rotations: bool = False
    learn_steps: int = 100
    learn_lr: float = 1.5
    learn_windows: int = 8
    learn_tokens: int | None = 512

    def __post_init__(self) -> None:
        if self.preset is not None:
            _choice("preset", self.preset, tuple(PRESETS))
        _choice("rotation", self.rotation, rotation_kinds())
        for name in ("r2_rotation", "r3_rotation", "r4_rotation"):
            _choice(name, getattr(self, name), tuple(ROTATION_KINDS))
        for name in ("w_bits", "a_bits", "kv_bits"):
            _integer(name, getattr(self, name), "an integer in 2..8, or 16 (not quantized)", lambda v: v in BITS)
        _integer("seed", self.seed, "a non-negative integer", lambda v: v >= 0)
        if self.gsr_group_size is not None:
            _integer("gsr_group_size", self.gsr_group_size, "None or a power of two ≥ 2",
                     lambda v: v >= 2 and v & (v - 1) == 0)
        _choice("gsr_permutation", self.gsr_permutation, GSR_PERMUTATIONS)
        for name in ("r1", "r2", "r4"):
            _flag(name, getattr(self, name))
        if self.r3 is not None:
            _flag("r3", self.r3)
        _choice("lowering", self.lowering, LOWERINGS)
        _choice("wrapper", self.wrapper, WRAPPERS)
        if self.wrapper == "cpp" and self.lowering != "inductor":
            raise ValueError(f"quarot-fx: option 'wrapper'='cpp' is Inductor's C++ wrapper and needs "
                             f"lowering='inductor' (got lowering={self.lowering!r})")
        method = weight_method(self.weights) if isinstance(self.weights, str) else None
        if method is None:
            _choice("weights", self.weights, weight_methods())
        _choice("kernels", self.kernels, KERNELS)
        _choice("int_gemm", self.int_gemm, gemm_policies())
        if self.int_gemm == "auto":
            gemm_environment()
        _choice("resident_weights", self.resident_weights, RESIDENT_WEIGHTS)
        _choice("kv_cache", self.kv_cache, KV_CACHES)
        _choice("prefill_attention", self.prefill_attention, PREFILL_ATTENTIONS)
        if self.prefill_attention == "int8" and (self.kv_bits > 4 or self.kv_cache != "packed"):
            raise ValueError(f"quarot-fx: option 'prefill_attention'='int8' multiplies queries with 4-bit key codes "
                             f"and needs kv_bits ≤ 4 and kv_cache='packed' (got kv_bits={self.kv_bits}, "
                             f"kv_cache={self.kv_cache!r})")
        if self.w_group_size is not None:
            _integer("w_group_size", self.w_group_size, "None or a positive integer", lambda v: v >= 1)
        if not isinstance(self.quantize_lm_head, bool) and self.quantize_lm_head not in HEAD_MODES:
            raise ValueError("quantize_lm_head must be one of False, True, 'auto', 'int8', 'w8a8'; "
                             f"got {self.quantize_lm_head!r}")
        for name in ("w_clip_search", "gptq_act_order", "gptq_sequential", "observe_inputs"):
            _flag(name, getattr(self, name))
        for name in ("a_clip", "kv_clip"):
            value = getattr(self, name)
            if value is not None and value != "gbs" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                         or not 0 < value <= 1):
                raise ValueError(f"{name} must be None, a number in (0, 1] or 'gbs'; got {value!r}")
        _integer("expand", self.expand, "a non-negative integer", lambda v: v >= 0)
        _choice("gbs_objective", self.gbs_objective, GBS_OBJECTIVES)
        _integer("gbs_windows", self.gbs_windows, "a positive integer", lambda v: v >= 1)
        _integer("gbs_iterations", self.gbs_iterations, "an integer in 1..20", lambda v: 1 <= v <= 20)
        if self.gbs_tokens is not None:
            _integer("gbs_tokens", self.gbs_tokens, "None or a positive integer", lambda v: v >= 1)
        if self.searches_clips and not self.has_calibration:
            raise ValueError("a_clip='gbs' / kv_clip='gbs' needs calibration=[token-id tensors] for the search "
                             "(e.g. quarot_fx.tools.evaluate.calibration_windows)")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) or not 0 < self.gptq_damp < 1:
            raise ValueError(f"gptq_damp must be a number in (0, 1); got {self.gptq_damp!r}")
        _integer("gptq_block_size", self.gptq_block_size, "a positive integer", lambda v: v >= 1)
        if self.calibrated is not None:
            if not isinstance(self.calibrated, Calibrated):
                raise ValueError("calibrated must be a quarot_fx.artifact.Calibrated (what quarot_fx.load passes); "
                                 f"got {type(self.calibrated).__name__}")
        if self.calibration is not None:
            if not isinstance(self.calibration, (list, tuple)) or not self.calibration or not all(
                    isinstance(t, torch.Tensor) and not t.is_floating_point() for t in self.calibration):
                raise ValueError("calibration must be a non-empty list of token-id tensors; got "
                                 f"{type(self.calibration).__name__}")
        _flag("smoothrot", self.smoothrot)
        if isinstance(self.smoothrot_alpha, bool) or not isinstance(self.smoothrot_alpha, (int, float)) \
                or not 0 <= self.smoothrot_alpha <= 1:
            raise ValueError(f"smoothrot_alpha must be a number in [0, 1]; got {self.smoothrot_alpha!r}")
        if self.smoothrot and not self.has_calibration:
            raise ValueError("smoothrot=True needs calibration=[token-id tensors] for its channel statistics "
                             "(e.g. quarot_fx.tools.evaluate.calibration_windows)")
        if method.needs_calibration and self.w_bits < 16 and not self.has_calibration:
            raise ValueError(f"weights={self.weights!r} needs calibration=[token-id tensors] "
                             "(e.g. quarot_fx.tools.evaluate.calibration_windows)")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1); got {self.sparsity!r}")
        nm = parse_pattern(self.sparsity_pattern)
        if nm is not None and self.sparsity not in (0, 1 - nm[0] / nm[1]):
            raise ValueError(f"sparsity={self.sparsity} contradicts sparsity_pattern={self.sparsity_pattern!r}, "
                             f"which prunes {1 - nm[0] / nm[1]:g}: give one of them")
        if self.prunes and self.w_bits >= 16:
            raise ValueError(f"sparsity / sparsity_pattern prune quantized weights: set w_bits < 16 (got {self.w_bits})")
        if self.gptq_act_order and self.w_bits < 16 and (self.prunes or (method.needs_calibration
                                                                           and not method.act_order)):
            raise ValueError(f"gptq_act_order=True works with dense GPTQ only, not with sparsity or weights="
                             f"{self.weights!r} (their column order is the mask's)")
        if self.observe_inputs and self.calibration is None:
            raise ValueError("observe_inputs=True needs calibration=[token-id tensors]: the text it observes")
        if self.prunes and not self.has_calibration:
            raise ValueError("sparsity needs calibration=[token-id tensors]: the Wanda mask scores |W|·‖x‖ "
                             "(e.g. quarot_fx.tools.evaluate.calibration_windows)")
        self._check_learning()

    def _check_learning(self) -> None:
        _flag("learn_rotations", self.learn_rotations)
        _integer("learn_steps", self.learn_steps, "a non-negative integer", lambda v: v >= 0)
        if isinstance(self.learn_lr, bool) or not isinstance(self.learn_lr, (int, float)) or not self.learn_lr > 0:
            raise ValueError(f"learn_lr must be a positive number; got {self.learn_lr!r}")
        _integer("learn_windows", self.learn_windows, "a positive integer", lambda v: v >= 1)
        if self.learn_tokens is not None:
            _integer("learn_tokens", self.learn_tokens, "None or an integer ≥ 2", lambda v: v >= 2)
        if not self.learn_rotations:
            return
        if not self.has_calibration:
            raise ValueError("learn_rotations=True needs calibration=[token-id tensors]: the text it learns on "
                             "(e.g. quarot_fx.tools.evaluate.calibration_windows)")
        if self.rotation == "none" or not (self.r1 or self.r2):
            raise ValueError("learn_rotations=True learns R1 and R2: set rotation to a kind other than 'none' "
                             f"and r1 or r2 to True (got rotation={self.rotation!r}, r1={self.r1}, r2={self.r2})")
        if self.calibrates_weights and not self.gptq_sequential:
            raise ValueError(f"learn_rotations=True with weights={self.weights!r} needs gptq_sequential=True: the "
                             "rotations are learned with the activations quantized, and GPTQ then quantizes the "
                             "learned weights sequentially")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | QuaRotConfig | None = None) -> QuaRotConfig:
        """Validate a backend ``options`` dict: the preset first, then the explicit keys."""
        if isinstance(options, QuaRotConfig):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise TypeError("quarot options must be a mapping of option names to values, e.g. "
                            f"options={{'preset': 'w4a4kv4'}}; got {type(options).__name__} {options!r}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.keys()))
        if unknown:
            raise ValueError(
                f"unknown quarot option(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys: {', '.join(cls.keys())}"
            )
        preset = options.get("preset")
        if preset is not None:
            _choice("preset", preset, tuple(PRESETS))
            options = {**PRESETS[preset], **options}
        return cls(**options)

    def to_options(self) -> dict[str, Any]:
        """The options dict that rebuilds this config (for ``torch.compile(options=...)``)."""
        return {k: getattr(self, k) for k in self.keys()}

    def summary(self) -> dict[str, Any]:
        """Options for reports: calibration tensors shown by count."""
        options = self.to_options()
        if self.calibration is not None:
            options["calibration"] = f"{len(self.calibration)} tensors, {sum(t.numel() for t in self.calibration)} tokens"
        if self.calibrated is not None:
            options["calibrated"] = f"restored: {self.calibrated}"
        return options

    def replace(self, **changes: Any) -> QuaRotConfig:
        return QuaRotConfig.from_options({**self.to_options(), **changes})

    def kv_signature(self) -> str:
        """What decides the basis and precision of the keys and values a compiled model caches."""
        return (f"rotation={self.rotation}/{self.seed}/{self.gsr_group_size}/{self.gsr_permutation}/{self.expand} r2={self.r2 and self.r2_rotation} "
                f"r3={self.applies_r3 and self.r3_rotation} "
                f"kv={self.kv_bits}/{'gbs' if self.kv_clip == 'gbs' else self.kv_cache_clip}"
                + (f" learned={self.calibration_id()}" if self.learn_rotations else ""))

    @property
    def rotates(self) -> bool:
        return self.rotation != "none" and any((self.r1, self.r2, self.applies_r3, self.r4))

    @property
    def applies_r3(self) -> bool:
        """R3 (queries/keys) runs online on every query and key: by default only where the keys it
        prepares are quantized (``kv_bits < 16``); ``r3=True``/``False`` decides explicitly."""
        return self.kv_bits < 16 if self.r3 is None else self.r3

    @property
    def has_calibration(self) -> bool:
        """Calibration data, or what an earlier calibration produced (a loaded artifact)."""
        return self.calibration is not None or self.calibrated is not None

    def calibration_id(self) -> str | None:
        """Fingerprint of the calibration data (or of the data the loaded artifact was calibrated on)."""
        if self.calibrated is not None:
            return self.calibrated.fingerprint
        if self.calibration is None:
            return None
        return fingerprint(self.calibration)

    @property
    def pruned_fraction(self) -> float:
        """The fraction of zeros the sparsity options ask for (an N:M pattern fixes it)."""
        return pattern_sparsity(self.sparsity, self.sparsity_pattern)

    @property
    def prunes(self) -> bool:
        return self.pruned_fraction > 0

    @property
    def calibrates_weights(self) -> bool:
        """Weights come from the calibration pass (GPTQ, OBR, or any pruning: Wanda needs ‖x‖)."""
        return self.w_bits < 16 and (weight_method(self.weights).needs_calibration or self.prunes)

    @property
    def searches_clips(self) -> bool:
        return (self.a_clip == "gbs" and self.a_bits < 16) or (self.kv_clip == "gbs" and self.kv_bits < 16)

    @property
    def activation_clip(self) -> float:
        """The fixed clip (with ``"gbs"``: the default the search replaces)."""
        fixed = self.a_clip not in (None, "gbs")
        return self.a_clip if fixed else (0.9 if self.a_bits <= 4 else 1.0)

    @property
    def kv_cache_clip(self) -> float:
        fixed = self.kv_clip not in (None, "gbs")
        return self.kv_clip if fixed else (0.95 if self.kv_bits <= 4 else 1.0)

    @property
    def keeps_weight_codes(self) -> bool:
        """4-bit weights stay codes and scales until the lowering: packed for ``quantized_linear``,
        or, with ``kernels="fake"`` and quantized activations, float codes for the simulated
        linear, which then computes what the integer kernels compute."""
        return self.w_bits == 4 and (self.kernels == "integer" or self.a_bits < 16)

    @property
    def transforms(self) -> bool:
        """Anything to do at all: a rotation, a quantization or SmoothRot's channel scaling."""
        return self.rotates or self.quantizes or self.smoothrot or self.observe_inputs

    @property
    def head_mode(self) -> str | None:
        """What the output head becomes when weights are quantized: ``"w8a8"``
        (``int8_dynamic_linear``), ``"int8"`` (``int8_weight_linear``), or None (float, or
        quantized like every other linear). ``"auto"`` rounds the head's activations to int8 only
        where the config quantizes activations anyway: a weight-only config keeps them float."""
        if isinstance(self.quantize_lm_head, bool) or self.w_bits >= 16:
            return None
        if self.quantize_lm_head == "auto":
            return "w8a8" if self.a_bits < 16 else "int8"
        return self.quantize_lm_head

    @property
    def int8_head(self) -> bool:
        """The output head becomes one of the 8-bit head ops (``head_mode``)."""
        return self.head_mode is not None

    @property
    def quantizes(self) -> bool:
        return min(self.w_bits, self.a_bits, self.kv_bits) < 16

