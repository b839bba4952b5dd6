"""The ``quarot`` torch.compile backend: lift weights, run the passes, lower.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="quarot", options={...})`` finds it. Dynamo calls
``quarot_backend(gm, example_inputs, options=...)`` once per graph (again on a recompile,
e.g. for a new sequence length).
"""

from __future__ import annotations

import time

import torch
import torch.fx as fx

from .config import QuaRotConfig
from .passes.lift_params import lift_parameters
from .passes.pipeline import PassContext, passes_for, run_passes
from .report import Report, Skip, publish


def _lower(gm: fx.GraphModule, inputs: list, config: QuaRotConfig):
    if config.lowering == "fx":
        return gm
    from torch._inductor.compile_fx import compile_fx

    from .kernels.activation_quant import register_inductor_decompositions

    register_inductor_decompositions()
    # Freezing treats the lifted weights as constants (folding what depends only on them);
    # it applies to inference graphs, hence no_grad.
    with torch.no_grad():
        return compile_fx(gm, inputs, config_patches={"freezing": True})


def private_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of Dynamo's graph to rewrite: Dynamo derives the call arguments from the
    placeholders of the module it handed over, so that one must stay as it is."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = dict(gm._param_name_to_source)
    return copy


def quarot_backend(gm: fx.GraphModule, example_inputs: list, options=None):
    """Compile one Dynamo graph with quarot-fx. ``options``: see :class:`QuaRotConfig`."""
    config = QuaRotConfig.from_options(options)
    gm = private_copy(gm)
    passes = passes_for(config)
    report = Report(graph=f"graph with {len(gm.graph.nodes)} nodes", options=config.summary())

    start = time.perf_counter()
    lifted = lift_parameters(gm, example_inputs)
    report.lifted_constants = len(lifted.fqn_by_attr)
    report.skipped.extend(
        Skip(f"buffer {fqn}", why) for fqn, why in lifted.left_as_inputs.items()
    )
    report.seconds["lift_parameters"] = time.perf_counter() - start

    run_passes(PassContext(gm, config, report, lifted, list(example_inputs)), passes)

    report.graph_module = gm
    start = time.perf_counter()
    compiled = _lower(gm, lifted.runtime_inputs(example_inputs), config)
    report.seconds[f"lower ({config.lowering})"] = time.perf_counter() - start
    publish(report)

    def run(*args):
        # Dynamo still passes the lifted weights; the compiled graph holds its own copies.
        return compiled(*lifted.runtime_inputs(args))

    run.quarot_report = report
    run.runtime_inputs = lifted.runtime_inputs(example_inputs)  # for inspecting report.graph_module
    return run

