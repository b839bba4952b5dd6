"""R4: an online Hadamard on the input of linears that read a non-invariant activation.

For any linear, y = x·Wᵀ = (x·H)·(W·H)ᵀ, so the rotation is always exact; QuaRot applies
it where outliers arise and nothing upstream can absorb a rotation: the input of the MLP
down-projection, produced by ``act(gate) * up``. Structurally: a linear whose input is
computed in the graph and is neither the residual stream (R1) nor an attention output (R2). A size without a Hadamard matrix is
zero-padded to the next one that has one (dimension expansion), which stays exact.
"""

from __future__ import annotations

import torch.fx as fx

from quarot_fx.compiled import OnlineRotation
from quarot_fx.report import Region, Skip
from quarot_fx.numerics.rotations import padded_order, rotation_kind

from .online import insert_rotation
from .graph_utils import Site, as_site, keeps_last_dim, label, op_name, origin
from .matrices import Rotation
from .edits import InputRotation, PadInput


def attention_output_sites(gm: fx.GraphModule, attentions: list) -> set[fx.Node]:
    """Linears that read an attention output through reshapes only (whatever R2 decided)."""
    found = set()
    for attention in attentions:
        frontier = [attention.output]
        for _ in range(16):
            nxt = []
            for node in frontier:
                for user in node.users:
                    site = as_site(user)
                    if site is not None and site.input_node is node:
                        found.add(user)
                    elif op_name(user) in ("view", "reshape", "transpose", "contiguous", "permute") \
                            or keeps_last_dim(user, node):
                        nxt.append(user)
            frontier = nxt
    return found


def find_down_projections(gm: fx.GraphModule, residual_readers: set[fx.Node],
                          attention_outputs: set[fx.Node]) -> list[Site]:
    sites = []
    for node in gm.graph.nodes:
        site = as_site(node)
        if site is None or site.kind == "embedding":
            continue
        if node in residual_readers or node in attention_outputs or origin(site.input_node).op not in ("call_function", "call_method"):
            continue
        sites.append(site)
    return sites


def r4_rotation_for(config, n: int) -> Rotation | str:
    """R4 for an input of width n (its order is larger when the kind zero-pads), or why none."""
    name = config.r4_rotation
    size = padded_order(name, n)
    if size is None:
        return f"{rotation_kind(name).problem(n, None)} (r4_rotation={name!r} cannot be zero-padded to another order)"
    variant = config.gsr_permutation if name == "gsr" else None  # as for R1: the gsr options apply to every gsr rotation
    return Rotation(name, size, config.seed, None, variant)


def rotate_down_projections(ctx) -> None:
    """Pass R4: online rotation (zero-padded if the kind allows) on the input, inverse folded into W."""
    name = ctx.config.r4_rotation
    for site in ctx.analysis.down_projections:
        n = site.in_features
        rotation = r4_rotation_for(ctx.config, n)
        if isinstance(rotation, str):
            ctx.report.skipped.append(Skip(f"R4 at {label(site.node)}", rotation))
            continue
        size = rotation.n
        insert_rotation(ctx.gm, site.node, site.input_node, rotation, pad_to=size)
        entry = ctx.edits(site)
        if size != n:
            entry.edits.append(PadInput(size, online=True))
            entry.online.append(f"zero-pad {n}→{size}")
        entry.edits.append(InputRotation(rotation, online=True))
        entry.online.append(rotation.describe())
        ctx.artifact.online.append(OnlineRotation("R4", label(site.node), rotation, n))
        padded = f" (padded from {n})" if size != n else ""
        ctx.report.regions.append(Region("R4", size, f"online {name}" + padded, label(site.node)))
