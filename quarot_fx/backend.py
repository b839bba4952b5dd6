"""The ``quarot`` torch.compile backend: lift weights, run the passes, lower, and stay bound.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="quarot", options={...})`` finds it. Dynamo calls
``quarot_backend(gm, example_inputs, options=...)`` once per graph (again on a recompile,
e.g. for a new sequence length).

The compiled graph holds *transformed* weights (rotated, folded, quantized), but Dynamo
keeps passing the parameters on every call and may reuse one graph for other parameters:
a second model of the same shapes, a repeated block after a graph break, a weight changed
in place. So each call checks the parameters it receives against those it was built from
(identity and version counter) and, when they differ, builds again from the untouched
Dynamo graph (transformed weights are cached per parameter): never an answer computed with
someone else's weights.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from .compiled import CompiledArtifact
from .config import QuaRotConfig
from .passes.graph_utils import size_hint
from .passes.lift_params import lift_parameters
from .passes.context import PassContext
from .passes.pipeline import passes_for, run_passes
from .report import QuaRotWarning, Report, Skip, publish


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every BoundGraph of this process: save and export find them


def live_graphs() -> list:
    """Every quarot-compiled graph alive in this process (``save`` and ``export`` pick a model's)."""
    return list(_LIVE)


class ForeignCacheError(RuntimeError):
    """A KV cache filled by another model (or the eager one) was passed to a compiled model."""


KV_OWNER = "_quarot_fx_kv_owner"  # attribute on tensors a compiled model returns (its cache entries)


def _lower(gm: fx.GraphModule, inputs: list, config: QuaRotConfig):
    if config.kernels == "integer":
        from .kernels import native_ops

        native_ops.load()  # the ops' CPU calls skip Python where the C kernels cover them (built once)
    if config.lowering == "fx":
        return gm
    from torch._inductor.compile_fx import compile_fx

    from .kernels.activation_quant import register_inductor_decompositions

    register_inductor_decompositions()
    # Freezing treats the lifted weights as constants (folding what depends only on them);
    # it applies to inference graphs, hence no_grad. emulate_precision_casts: a bf16/fp16 value
    # is rounded where eager rounds it (Inductor otherwise keeps fused intermediates in float32),
    # so the simulated and the integer paths, and eager, round alike. cpp_wrapper: the kernels are
    # called from C++ (the ops through the dispatcher), not from a Python function. No size,
    # stride or alignment asserts on the ops' outputs at run time: a decode step of SmolLM2-135M
    # ran ~700 of them (~0.8 ms of a 15 ms step); tests/test_fake_layouts.py checks instead that
    # each op's fake gives its real outputs' shapes and strides.
    patches = {"freezing": True, "emulate_precision_casts": True, "cpp_wrapper": config.wrapper == "cpp",
               "size_asserts": False, "alignment_asserts": False}
    with torch.no_grad():
        return compile_fx(gm, inputs, config_patches=patches)


def private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph to rewrite: Dynamo derives the call arguments from the
    placeholders of the module it handed over, so that one must stay as it is."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = dict(gm._param_name_to_source)
    return copy


@dataclass
class Build:
    """One compilation of a graph, for one set of parameters (and their versions)."""

    compiled: object
    report: Report
    artifact: CompiledArtifact  # what save and export read
    runtime: list[int]  # positions of the call's arguments the compiled graph takes
    bound: list[tuple[int, torch.Tensor, int]]  # (argument position, parameter, version at build)
    cache_inputs: list[int]  # runtime positions holding KV-cache tensors of rotated/quantized attention

    def matches(self, args) -> bool:
        for position, param, version in self.bound:
            arg = args[position]
            if arg is not param or arg._version != version:
                return False
        return True


def _check_grad_mode(lifted) -> None:
    if not torch.is_grad_enabled():
        return
    trainable = [fqn for attr, fqn in lifted.fqn_by_attr.items() if lifted.originals[attr].requires_grad]
    if trainable:
        raise RuntimeError(
            "quarot-fx compiles for inference: its weights are rotated and quantized constants, so no "
            f"gradient can reach {trainable[0]} (and {len(trainable) - 1} more). Call the compiled model under "
            "torch.no_grad() or torch.inference_mode(), or freeze it with model.requires_grad_(False).")


def _report_non_finite(lifted, report: Report) -> None:
    for attr, fqn in lifted.fqn_by_attr.items():
        tensor = lifted.originals[attr]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            message = (f"parameter {fqn} holds {bad} non-finite value(s) (NaN/Inf): outputs that depend on "
                       "it are non-finite, as in eager")
            report.notes.append(message)
            warnings.warn(QuaRotWarning(message), stacklevel=2)


def _build(gm: fx.GraphModule, example_inputs: list, config: QuaRotConfig) -> Build:
    gm = private_copy(gm)
    report = Report(graph=f"graph with {len(gm.graph.nodes)} nodes", options=config.summary())
    start = time.perf_counter()
    lifted = lift_parameters(gm, example_inputs)
    _check_grad_mode(lifted)
    report.lifted_constants = len(lifted.fqn_by_attr)
    report.skipped.extend(Skip(f"buffer {fqn}", why) for fqn, why in lifted.left_as_inputs.items())
    _report_non_finite(lifted, report)
    report.seconds["lift_parameters"] = time.perf_counter() - start

    # symbolic sizes as this call's values: the calibration passes run the graph on real tensors
    ctx = PassContext(gm, config, report, lifted, [size_hint(x) for x in example_inputs])
    run_passes(ctx, passes_for(config))
    report.warn_skips()

    report.graph_module = gm
    runtime = lifted.runtime_inputs(example_inputs)
    start = time.perf_counter()
    compiled = _lower(gm, runtime, config)
    report.seconds[f"lower ({config.lowering})"] = time.perf_counter() - start
    publish(report)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    cache_inputs = [placeholders.index(n) for n in ctx.kv_cache_inputs if n in placeholders]
    bound = [(lifted.position_of[attr], tensor, tensor._version) for attr, tensor in lifted.originals.items()]
    return Build(compiled, report, ctx.artifact, lifted.kept_inputs, bound, cache_inputs)


class BoundGraph:
    """What Dynamo runs for one graph: the build that matches the parameters of the call."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, config: QuaRotConfig):
        self.template = private_copy(gm)  # untouched, for builds with other parameters
        self.config = config
        self.owner = config.kv_signature()
        self.current = _build(self.template, list(example_inputs), config)
        self.builds = {self._key(self.current.bound): self.current}
        _LIVE.add(self)  # quarot_fx.save finds a model's graphs here (only whole ones: a failed build is not)
        self.quarot_report = self.current.report
        self.runtime_inputs = [example_inputs[i] for i in self.current.runtime]

    @staticmethod
    def _key(bound) -> tuple:
        return tuple(id(param) for _, param, _ in bound)

    def _select(self, args) -> Build:
        key = tuple(id(args[position]) for position, _, _ in self.current.bound)
        build = self.builds.get(key)
        if build is None or not build.matches(args):
            build = _build(self.template, list(args), self.config)
            self.builds[key] = build
        return build

    def __call__(self, *args):
        build = self.current
        if not build.matches(args):
            build = self.current = self._select(args)
        runtime = [args[i] for i in build.runtime]
        for position in build.cache_inputs:
            if getattr(runtime[position], KV_OWNER, None) != self.owner:
                raise ForeignCacheError(
                    "quarot-fx: the KV cache passed to this compiled model was filled by another model (the "
                    "eager one, or one compiled with other rotation/KV options). Its keys and values are in "
                    "another basis or precision, so attention would be wrong. Run the whole generation "
                    "(prefill and decode) with the same compiled model, e.g. compiled.generate(...), or "
                    "start from a fresh cache.")
        outputs = build.compiled(*runtime)
        for out in outputs if isinstance(outputs, (list, tuple)) else (outputs,):
            if isinstance(out, torch.Tensor):
                setattr(out, KV_OWNER, self.owner)
        return outputs


def quarot_backend(gm: fx.GraphModule, example_inputs: list, options=None):
    """Compile one Dynamo graph with quarot-fx. ``options``: see :class:`QuaRotConfig`."""
    config = QuaRotConfig.from_options(options)
    return BoundGraph(gm, example_inputs, config)


def compile(model, config: QuaRotConfig | None = None, *, fullgraph: bool = False, dynamic=None, **options):
    """``torch.compile(model, backend="quarot", options=...)`` with options checked up front.

    The result's ``generate()`` runs the compiled (quantized) forward at every step."""
    if config is not None and options:
        raise ValueError("pass either a QuaRotConfig or option keywords, not both")
    config = config or QuaRotConfig.from_options(options)
    return torch.compile(model, backend="quarot", options=config.to_options(), fullgraph=fullgraph, dynamic=dynamic)
