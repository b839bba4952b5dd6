"""The calibration window runner: the graph run on calibration tokens, node by node.

:func:`run_calibration` feeds calibration windows (cut to the compiled shape) to the graph's
token-id input, found structurally (what the embedding lookup reads); every other input keeps
its example value. It runs node by node over all windows at once and computes only what the
observed sites' inputs depend on (no output head, no logits), so at each site every window's
input is at hand: a statistic sees all of them (SmoothRot, the outlier picture), sequential GPTQ
can quantize the site and let every later node see the quantized weight, in one pass over the
graph, and GBS can re-run the rest of the graph from a site (``Windows``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .graph_utils import as_site, origin
from .surgery import side_effects

# visit(site, inputs) sees the site's input for every window; it may return a replacement
# weight (logical [out, in]) that the site and everything after it then compute with.
Visit = Callable[[object, list], torch.Tensor | None]


def token_input(residual_plans) -> fx.Node | None:
    """The placeholder holding token ids: what the residual stream's embedding reads."""
    for plan in residual_plans:
        ids = as_site(plan.seed).input_node
        if isinstance(ids, fx.Node) and origin(ids).op == "placeholder":
            return origin(ids)
    return None


def sequence_length_inputs(graph: fx.Graph, tokens: fx.Node) -> list[fx.Node] | None:
    """The integer inputs that carry the token input's (symbolic) length, if the graph can run
    windows of another length: only ``tokens`` and those integers depend on it. None: it cannot."""
    example = tokens.meta.get("example_value")
    length = example.shape[-1] if isinstance(example, torch.Tensor) else None
    if not isinstance(length, torch.SymInt):
        return None
    carriers = []
    for node in graph.nodes:
        if node.op != "placeholder" or node is tokens:
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) and str(value) == str(length):
            carriers.append(node)
        elif isinstance(value, torch.Tensor) and any(str(s) == str(length) for s in value.shape):
            return None  # an input shaped by the length (a mask, positions): no value to give it
    return carriers


def _chunks(calibration, shape) -> list[torch.Tensor]:
    tokens = torch.cat([t.reshape(-1) for t in calibration])
    size = shape[0] * shape[1]
    return [tokens[i:i + size].reshape(shape) for i in range(0, tokens.numel() - size + 1, size)]


def ancestors(roots) -> set[fx.Node]:
    """The nodes ``roots`` depend on, themselves included."""
    seen: set[fx.Node] = set()
    stack = [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _needed(graph: fx.Graph, sites) -> set[fx.Node]:
    """Nodes the sites' inputs depend on, plus in-place writes before the last site."""
    order = list(graph.nodes)
    last = max(order.index(s.node) for s in sites)
    return ancestors([s.input_node for s in sites] + [n for n in order[:last] if side_effects(n)])


def last_uses(nodes: list[fx.Node]) -> dict[fx.Node, int]:
    """Where in ``nodes`` each value is used for the last time (it can be freed after that)."""
    last = {}
    for i, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last[used] = i
    return last


def linear_override(site, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[dict], torch.Tensor]:
    """A site's value computed from a logical [out, in] weight (and bias: by default the one the
    graph reads), whatever the site's kind: for :attr:`Windows.override`."""
    def compute(env):
        x = env[site.input_node]
        b = bias if bias is not None else (env[site.bias_node] if site.bias_node is not None else None)
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if b is None else b.to(x.dtype))

    return compute


class Windows:
    """The graph run node by node on several calibration windows at once (node-major), each
    window in its own environment, so whatever a node sees is at hand for every window.

    ``override[node]`` computes a node from a window's environment instead of the graph (a
    quantized weight for sequential GPTQ, a clip under search); :meth:`run` executes a list of
    nodes and frees values after their last use in that list.
    """

    def __init__(self, ctx, limit: int | None = None, length: int | None = None):
        graph = ctx.gm.graph
        self.tokens_node = token_input(ctx.analysis.residual)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        inputs = list(ctx.lifted.runtime_inputs(ctx.example_inputs))
        shape = () if self.tokens_node is None else tuple(inputs[placeholders.index(self.tokens_node)].shape)
        self._inputs = dict(zip(placeholders, inputs))
        if length is not None and shape:  # the caller checked that the graph takes it (sequence_length_inputs)
            shape = (*shape[:-1], length)
            self._inputs.update({node: length for node in sequence_length_inputs(graph, self.tokens_node)})
        self.chunks = [] if self.tokens_node is None else _chunks(ctx.config.calibration, shape)[:limit]
        self.runners = [fx.Interpreter(ctx.gm) for _ in self.chunks]
        self._constants: dict[fx.Node, object] = {}
        self.override: dict[fx.Node, Callable[[dict], torch.Tensor]] = {}

    def value(self, window: int, node: fx.Node, env: dict | None = None):
        """One window's value of ``node`` from ``env`` (default: the window's own environment)."""
        runner = self.runners[window]
        if node.op == "placeholder":
            example = self._inputs[node]
            if node is self.tokens_node:
                return self.chunks[window].to(example.device)
            return example.clone() if any(side_effects(u) for u in node.users) else example
        if node.op == "get_attr":  # constants: fetched once, shared by every window
            if node not in self._constants:
                self._constants[node] = runner.run_node(node)
            return self._constants[node]
        if env is not None:
            runner.env, kept = env, runner.env
        try:
            if node in self.override:
                return self.override[node](runner.env)
            return runner.run_node(node)
        finally:
            if env is not None:
                runner.env = kept

    def run(self, nodes: list[fx.Node], at: Callable[[fx.Node], None] = lambda node: None,
            skip: frozenset = frozenset()) -> None:
        """Execute ``nodes`` in order for every window, calling ``at(node)`` before each (nodes in
        ``skip`` get the call but are not computed)."""
        last_use = last_uses(nodes)
        with torch.no_grad():
            for i, node in enumerate(nodes):
                at(node)
                for w, runner in enumerate(self.runners if node not in skip else ()):
                    runner.env[node] = self.value(w, node)
                for used in node.all_input_nodes:
                    if last_use[used] == i:
                        for runner in self.runners:
                            runner.env.pop(used, None)

    def inputs_of(self, node: fx.Node) -> list:
        return [runner.env[node] for runner in self.runners]


def run_calibration(ctx, sites, visit: Visit, desc: str, limit: int | None = None) -> int | None:
    """Run the graph on every calibration window (the first ``limit``), calling ``visit`` at each
    site (graph order); returns the number of windows, or None if there is no token-id input."""
    windows = Windows(ctx, limit)
    if windows.tokens_node is None:
        return None
    if not sites:
        return 0
    needed = _needed(ctx.gm.graph, sites)
    by_node = {s.node: s for s in sites}
    bar = tqdm(total=len(sites), desc=desc, leave=False)

    def at(node):
        site = by_node.get(node)
        if site is not None:
            weight = visit(site, windows.inputs_of(site.input_node))
            if weight is not None:  # the site computes with the replacement from now on
                windows.override[node] = linear_override(site, weight)
            bar.update()

    # Every site is visited; a site's own output is computed only if a later site needs it.
    nodes = [n for n in ctx.gm.graph.nodes if n in needed or n in by_node]
    windows.run(nodes, at, skip=frozenset(n for n in by_node if n not in needed))
    bar.close()
    return len(windows.chunks)
