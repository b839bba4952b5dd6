"""R1: find the residual stream from dataflow and rotate it.

An orthogonal Q can pass through an op when op(x·Q) = op(x)·Q. Such ops link their input
and output: conversions and reshapes that keep the last dimension, ``a + b`` (both sides
must share the basis), multiplication by a per-row scalar (RMSNorm's ``x * rsqrt(...)``).
Norm scales (``* w``, Gemma's ``* (1 + w)``, LayerNorm's affine part) also link, but leave
a pending ``scale``/``shift`` that the readers must fold. The links form a graph
(networkx); the component holding an embedding is the residual stream. It is valid when

* every value entering it is written by a foldable site (embedding table, linear, addmm),
* every norm scale is absorbed by readers (a scaled value must not flow back into an add),
* with LayerNorm, nothing but LayerNorms looks at the raw (mean-centered) residual.

Readers absorb Q (``W·diag(scale)·Q``), writers ``Qᵀ·W``; a value that leaves the
component any other way (returned, fed to an unknown op) gets an explicit inverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from quarot_fx.numerics.hadamard import nearest_hadamard_orders
from quarot_fx.report import Region, Skip
from quarot_fx.numerics.rotations import padded_order, rotation_kind

from .graph_utils import (
    Site, arg, as_site, constant_signature, evaluate_constant, first_arg, is_constant, is_metadata_use,
    keeps_last_dim, label, last_dim, op_name, scalar_like, shape,
)
from .matrices import Center, Rotation, build
from .edits import InputAffine, InputRotation, OutputTransform, PadInput, PadOutput

LINK_SAME, LINK_SCALE, LINK_LAYER_NORM, LINK_RMS_NORM = "same", "scale", "layer_norm", "rms_norm"
REDUCTIONS = {"mean", "sum"}


def basis_links(gm: fx.GraphModule) -> nx.DiGraph:
    """Edges input → output of every op that a rotation of the last dimension passes through."""
    links = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or last_dim(node) is None:
            continue
        d = last_dim(node)
        name = op_name(node)
        src = first_arg(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and shape(a) is not None]
        if isinstance(src, fx.Node) and keeps_last_dim(node, src):
            links.add_edge(src, node, kind=LINK_SAME)
        elif name in ("add", "sub", "iadd") and len(tensors) == 2 and all(last_dim(t) == d for t in tensors):
            for t in tensors:
                links.add_edge(t, node, kind=LINK_SAME)
        elif name == "neg":
            links.add_edge(src, node, kind=LINK_SAME)
        elif name in ("mul", "div", "truediv") and len(node.args) == 2:
            a, b = node.args
            for value, other in ((a, b), (b, a)):
                if name != "mul" and value is not a:
                    continue  # only x / s commutes, not s / x
                if not isinstance(value, fx.Node) or last_dim(value) != d or other is value:
                    continue
                if scalar_like(other) and d > 1:
                    links.add_edge(value, node, kind=LINK_SAME)
                    break
                if name == "mul" and isinstance(other, fx.Node) and is_constant(gm, other) \
                        and shape(other) is not None and shape(other)[-1] == d \
                        and all(s == 1 for s in shape(other)[:-1]):
                    links.add_edge(value, node, kind=LINK_SCALE, scale=other)
                    break
        elif name == "layer_norm" and tuple(node.args[1]) == (d,):
            links.add_edge(src, node, kind=LINK_LAYER_NORM)
        elif name == "rms_norm" and tuple(node.args[1]) == (d,):
            links.add_edge(src, node, kind=LINK_RMS_NORM)
    return links


@dataclass
class State:
    """How a rotated value relates to the original one: x = (x̃·Qᵀ) ⊙ scale + shift."""

    scale: fx.Node | None = None
    shift: fx.Node | None = None
    normalized: bool = False  # downstream of a norm (not the raw residual)

    @property
    def plain(self) -> bool:
        return self.scale is None and self.shift is None


@dataclass
class ResidualPlan:
    size: int
    seed: fx.Node
    members: list[fx.Node]
    states: dict[fx.Node, State] = field(default_factory=dict)
    writers: list[Site] = field(default_factory=list)
    readers: list[tuple[Site, fx.Node]] = field(default_factory=list)
    escapes: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)
    norm_links: list[tuple[fx.Node, str, fx.Node]] = field(default_factory=list)  # (node, kind, input)
    centered: bool = False
    problems: list[str] = field(default_factory=list)
    width: int | None = None  # rotated width when the stream is expanded (zero-padded), else None

    @property
    def valid(self) -> bool:
        return not self.problems


def _is_rms_statistic(user: fx.Node, value: fx.Node) -> bool:
    """``value ** 2`` (or ``value * value``) reduced over the last dim: invariant under Q."""
    name = op_name(user)
    squares = (name == "pow" and user.args[0] is value and user.args[1] == 2) or (
        name == "mul" and user.args[0] is value and user.args[1] is value)
    if not squares or not user.users:
        return False
    ndim = len(shape(value))
    for reduction in user.users:
        dims = arg(reduction, 1, "dim")
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        if op_name(reduction) not in REDUCTIONS or [d % ndim for d in dims if d is not None] != [ndim - 1]:
            return False
    return True


def analyze_component(gm: fx.GraphModule, links: nx.DiGraph, seed: fx.Node, members: set) -> ResidualPlan:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    plan = ResidualPlan(size=last_dim(seed), seed=seed, members=sorted(members, key=order.get))
    stats_on_plain = False
    for node in plan.members:
        incoming = list(links.in_edges(node, data=True)) if node in links else []  # a lone embedding
        if not incoming:
            site = as_site(node)
            if site is None:
                plan.problems.append(f"{node.name} ({label(node)}) writes into the residual stream through "
                                     f"'{op_name(node)}', which cannot absorb a rotation")
                continue
            plan.writers.append(site)
            plan.states[node] = State()
        else:
            plan.states[node] = _state_after(node, incoming, plan)
        state = plan.states[node]
        for user in node.users:
            if links.has_edge(node, user) or is_metadata_use(user, node):
                continue
            site = as_site(user) if user.op == "call_function" else None
            if site is not None and site.kind != "embedding" and site.input_node is node:
                plan.readers.append((site, node))
            elif state.plain and _is_rms_statistic(user, node):
                stats_on_plain = True
            else:
                plan.escapes.append((node, user))
    plan.centered = any(kind == LINK_LAYER_NORM for _, kind, _ in plan.norm_links)
    if plan.centered:
        raw_uses = [u for v, u in plan.escapes if not plan.states[v].normalized]
        raw_uses += [s.node for s, v in plan.readers if not plan.states[v].normalized]
        if stats_on_plain or raw_uses or any(k != LINK_LAYER_NORM for _, k, _ in plan.norm_links):
            plan.problems.append(
                "LayerNorm needs the residual mean-centered, but other ops read the raw residual "
                f"({', '.join(n.name for n in raw_uses[:3]) or 'an RMS norm'})")
    return plan


def _state_after(node: fx.Node, incoming, plan: ResidualPlan) -> State:
    kinds = {data["kind"] for _, _, data in incoming}
    sources = [plan.states.get(src, State()) for src, _, _ in incoming]
    if kinds == {LINK_SAME}:
        if len(incoming) == 1 and keeps_last_dim(node, incoming[0][0]):
            return sources[0]  # conversions and reshapes carry a pending scale along
        if all(s.plain for s in sources):
            # A per-row scale of a normalized value (RMSNorm's x * rsqrt) is still normalized.
            return State(normalized=len(sources) == 1 and sources[0].normalized)
        plan.problems.append(
            f"{node.name} ({label(node)}) combines a norm's scaled output with other values "
            "(e.g. a norm with a post-scale on the residual), so the scale cannot be folded into readers")
        return State()
    (src, _, data), = incoming
    if not sources[0].plain:
        plan.problems.append(f"{node.name} ({label(node)}) scales an already scaled value")
        return State()
    kind = data["kind"]
    plan.norm_links.append((node, kind, src))
    if kind == LINK_SCALE:
        return State(scale=data["scale"], normalized=sources[0].normalized)
    if kind == LINK_LAYER_NORM:
        weight = arg(node, 2, "weight")
        bias = arg(node, 3, "bias")
        return State(scale=weight, shift=bias, normalized=True)
    weight = arg(node, 2, "weight")
    return State(scale=weight, normalized=True)


def find_residual_streams(gm: fx.GraphModule) -> list[ResidualPlan]:
    """Every component of the basis-link graph that an embedding lookup writes into."""
    links = basis_links(gm)
    plans, covered = [], set()
    for node in gm.graph.nodes:
        site = as_site(node)
        if site is None or site.kind != "embedding" or node in covered:
            continue
        members = nx.node_connected_component(links.to_undirected(as_view=True), node) if node in links else {node}
        covered |= members
        plans.append(analyze_component(gm, links, node, members))
    return plans


def rotation_problem(kind: str, d: int, group: int | None) -> str | None:
    """Why a rotation of this kind cannot be built for size d (None if it can)."""
    problem = rotation_kind(kind).problem(d, group)
    if problem and kind in ("hadamard", "randomized_hadamard"):
        near = ", ".join(map(str, nearest_hadamard_orders(d)))
        return f"{problem} (nearest: {near})"
    return problem


def restore_basis(x: torch.Tensor, inverse: torch.Tensor, scale=None, shift=None) -> torch.Tensor:
    """Original value of a rotated one: (x̃·Qᵀ) ⊙ scale + shift (explicit inverse at an escape)."""
    y = x @ inverse.to(x.dtype)
    if scale is not None:
        y = y * scale
    if shift is not None:
        y = y + shift
    return y


def layers_of(sites: list[Site], fqn_of) -> str:
    indices = sorted({int(m) for s in sites for m in re.findall(r"\.(\d+)\.", fqn_of(s.weight_node.target))})
    return f"layers {indices[0]}–{indices[-1]}" if indices else "no numbered layers"


SIZED = {"view", "reshape", "expand"}  # ops whose arguments spell out the last dim


def expanded_width(config, d: int) -> int:
    """d + ``expand``, rounded up to an order the rotation kind can build (automatic when d has none)."""
    wanted = d + config.expand
    if config.rotation == "none":  # nothing rotates the residual: nothing to widen it for
        return d
    return padded_order(config.rotation, wanted, config.gsr_group_size) or wanted  # None: the problem is reported


def expansion_problems(plan: ResidualPlan) -> list[str]:
    """Why the stream's ops could not be widened (each must spell its last dim or keep it)."""
    problems = []
    for node in plan.members:
        name = op_name(node)
        if name in ("view_as", "reshape_as", "expand_as"):
            problems.append(f"{node.name} ({label(node)}) takes its shape from another tensor ('{name}'), "
                            "so the stream cannot be zero-padded")
    return problems


def rms_over_width(x: torch.Tensor, width: int, eps: float | None) -> torch.Tensor:
    """RMSNorm without scale whose mean of squares divides by the original width (expanded stream:
    the padded coordinates carry signal after R1, but ‖x̃‖ = ‖x‖)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) / width + eps).to(x.dtype)


def _widen(plan: ResidualPlan, gm: fx.GraphModule, width: int) -> None:
    """Rewrite the stream for width ``width``: sizes spelled in reshapes, and norms' means of
    squares over the original width."""
    d = plan.size
    for node in plan.members:
        if op_name(node) in SIZED and node.args and isinstance(node.args[-1], int) and node.args[-1] == d:
            node.args = (*node.args[:-1], width)
        elif op_name(node) in SIZED and len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
                and node.args[1] and node.args[1][-1] == d:
            node.args = (node.args[0], type(node.args[1])((*node.args[1][:-1], width)))
        elif op_name(node) in SIZED and len(node.args) == 2 and _size_call_ending_in(node.args[1], d):
            size = node.args[1]  # torch.Size([b, s, d]) with symbolic b or s (dynamic shapes)
            with gm.graph.inserting_before(node):
                widened = gm.graph.call_function(torch.Size, ([*size.args[0][:-1], width],))
            node.replace_input_with(size, widened)
        for user in list(node.users):
            if plan.states.get(node, State()).plain and _is_rms_statistic(user, node):
                for reduction in list(user.users):
                    if op_name(reduction) == "mean":
                        _mean_over(gm, reduction, d)


def _size_call_ending_in(arg, d: int) -> bool:
    return (isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.Size and len(arg.args) == 1
            and isinstance(arg.args[0], (list, tuple)) and len(arg.args[0]) > 0 and arg.args[0][-1] == d)


def _mean_over(gm: fx.GraphModule, reduction: fx.Node, d: int) -> None:
    """mean(x, dim, keepdim) → sum(x, dim, keepdim) / d."""
    x = reduction.args[0]
    dim = arg(reduction, 1, "dim")
    keepdim = arg(reduction, 2, "keepdim", False)
    with gm.graph.inserting_before(reduction):
        total = gm.graph.call_function(torch.sum, (x, dim), {"keepdim": keepdim})
        mean = gm.graph.call_function(torch.div, (total, d))
    reduction.replace_all_uses_with(mean)
    gm.graph.erase_node(reduction)


def residual_rotation(config, width: int) -> Rotation:
    """R1 of a stream of this width, as the config asks for it."""
    return Rotation(config.rotation, width, config.seed, config.gsr_group_size,
                    config.gsr_permutation if config.rotation == "gsr" else None)


def inverse_name(plan: ResidualPlan) -> str:
    """The buffer holding R1ᵀ for the values that leave this stream unrotated."""
    return f"qfx_r1_inverse_{plan.seed.name}"


def rotate_residual(ctx) -> None:
    """Pass: rotate every valid residual stream with R1 (config.rotation), fold norm scales."""
    gm, config, report = ctx.gm, ctx.config, ctx.report
    for plan in ctx.analysis.residual:
        if not plan.valid:
            continue
        width = plan.width or plan.size
        rotation = residual_rotation(config, width)
        if plan.centered:
            center = Center(plan.size)
        for site in plan.writers:
            edits = ctx.edits(site)
            if plan.centered:
                edits.edits.append(OutputTransform(center, 0, site.out_features))
            if width != plan.size:
                edits.edits.append(PadOutput(width))
            edits.edits.append(OutputTransform(rotation, 0, width))
        for site, value in plan.readers:
            state = plan.states[value]
            edits = ctx.edits(site)
            if not state.plain:
                edits.edits.append(InputAffine(
                    "scale=" + constant_signature(gm, state.scale, ctx.fqn_of)
                    + " shift=" + constant_signature(gm, state.shift, ctx.fqn_of),
                    evaluate_constant(gm, state.scale) if state.scale is not None else None,
                    evaluate_constant(gm, state.shift) if state.shift is not None else None))
            if width != plan.size:
                edits.edits.append(PadInput(width))
            edits.edits.append(InputRotation(rotation))
        _insert_inverses(ctx, plan, rotation)
        _record_folded_norms(ctx, plan)
        _strip_norm_scales(plan)
        if width != plan.size:
            _widen(plan, gm, width)
            report.counters["expanded_dims"] += width - plan.size
            ctx.artifact.expanded_dims += width - plan.size
        where = (f"residual stream: {len(plan.writers)} writers, {len(plan.readers)} readers, "
                 f"{len(plan.norm_links)} norm scales folded, {layers_of(plan.writers, ctx.fqn_of)}")
        if plan.centered:
            where += "; mean-centered (LayerNorm → RMSNorm)"
        if width != plan.size:
            where += f"; expanded {plan.size} → {width} (+{width - plan.size} zero dims, norms divide by {plan.size})"
        report.regions.append(Region("R1", width, rotation.describe(), where))


def _insert_inverses(ctx, plan: ResidualPlan, rotation: Rotation) -> None:
    if not plan.escapes:
        return
    gm = ctx.gm
    name = inverse_name(plan)
    gm.register_buffer(name, build(rotation).T[:, :plan.size].contiguous().to(torch.float32))  # back to d
    for value, user in plan.escapes:
        state = plan.states[value]
        with gm.graph.inserting_after(value):
            inverse = gm.graph.get_attr(name)
        with gm.graph.inserting_after(inverse):
            restored = gm.graph.call_function(restore_basis, (value, inverse, state.scale, state.shift))
        user.replace_input_with(value, restored)
        what = "a graph output" if user.op == "output" else f"'{op_name(user)}' ({label(user)})"
        ctx.report.counters["explicit_inverses"] += 1
        ctx.artifact.explicit_inverses += 1
        ctx.report.notes.append(f"R1: explicit inverse rotation before {what} reading {value.name}: "
                                "it does not absorb the rotation")


def _record_folded_norms(ctx, plan: ResidualPlan) -> None:
    """For export: which norm parameters the graph no longer reads (their scale now lives in the
    readers), and whether setting them to ones says so in the model's own terms."""
    for node, kind, _src in plan.norm_links:
        if kind == LINK_LAYER_NORM:
            why = "a LayerNorm became RMSNorm after mean-centering; the model class cannot say that"
            for weight in node.args[2:4]:
                if isinstance(weight, fx.Node) and weight.op == "get_attr":
                    ctx.artifact.folded_norms[ctx.fqn_of(weight.target)] = (why, ctx.lifted.originals.get(weight.target))
            continue
        scale = node.args[2] if kind == LINK_RMS_NORM and len(node.args) > 2 else \
            next((a for a in node.args if isinstance(a, fx.Node) and a is not _src), None)
        while isinstance(scale, fx.Node) and op_name(scale) in ("to", "type_as", "float"):
            scale = scale.args[0]
        if isinstance(scale, fx.Node) and scale.op == "get_attr":
            ctx.artifact.folded_norms[ctx.fqn_of(scale.target)] = ("ones", ctx.lifted.originals.get(scale.target))
        elif isinstance(scale, fx.Node):
            ctx.artifact.folded_norms[f"<{scale.name}>"] = (f"the norm scale at {label(node)} is an expression "
                                                          f"({op_name(scale)}), not a parameter", None)


def _strip_norm_scales(plan: ResidualPlan) -> None:
    """Norm scales now live in the readers: drop ``* w`` and make norms scale-free (in an
    expanded stream, over the original width)."""
    expanded = plan.width is not None and plan.width != plan.size
    for node, kind, src in plan.norm_links:
        if kind == LINK_SCALE:
            node.replace_all_uses_with(src)  # escapes' restore_basis re-applies the scale
        elif kind == LINK_LAYER_NORM or (kind == LINK_RMS_NORM and expanded):
            x, shape_, *rest = node.args
            default = 1e-5 if kind == LINK_LAYER_NORM else None
            eps = node.args[{LINK_LAYER_NORM: 4, LINK_RMS_NORM: 3}[kind]] \
                if len(node.args) > {LINK_LAYER_NORM: 4, LINK_RMS_NORM: 3}[kind] else node.kwargs.get("eps", default)
            if expanded:
                node.target, node.args, node.kwargs = rms_over_width, (x, plan.size, eps), {}
            else:
                node.target = torch.nn.functional.rms_norm
                node.args, node.kwargs = (x, shape_, None, eps), {}
        else:
            args = list(node.args)
            if len(args) > 2:
                args[2] = None
            node.args = tuple(args)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "weight"}


def skip_reasons(plans: list[ResidualPlan], config) -> list[Skip]:
    """Why R1 leaves streams alone (nothing when R1 was not asked for). An explicit
    ``gsr_group_size`` that does not fit the width is the user's error, not a skip."""
    if not (config.rotates and config.r1):
        return []
    if not plans:
        return [Skip("R1", "no residual stream: the graph has no embedding lookup of a weight table "
                     "(e.g. a graph break split the model; compile with fullgraph=True to see why)")]
    skips = []
    for plan in plans:
        if plan.valid:
            width = expanded_width(config, plan.size)
            if width != plan.size:
                plan.problems.extend(expansion_problems(plan))
                plan.width = width
            problem = rotation_problem(config.rotation, width, config.gsr_group_size)
            if problem and config.rotation == "gsr" and config.gsr_group_size is not None:
                fits = [g for g in (2, 4, 8, 16, 32, 64, 128, 256) if plan.size % g == 0]
                raise ValueError(f"gsr_group_size={config.gsr_group_size} does not divide the residual width "
                                 f"{plan.size}; use None or one of {fits}")
            if problem:
                plan.problems.append(problem)
        if not plan.valid:
            skips.append(Skip(f"R1 residual stream of {plan.seed.name} (size {plan.size})",
                              "; ".join(plan.problems)))
    return skips
