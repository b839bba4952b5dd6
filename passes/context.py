"""The typed state every pass reads and writes: the graph, the analysis, and per-call data.

Nothing here lives in a module global: two compiles (two models, two threads of work) never
see each other's Hessians or sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from quarot_fx.compiled import CompiledArtifact
from quarot_fx.config import QuaRotConfig
from quarot_fx.report import Report

from .graph_utils import Site
from .lift_params import LiftedConstants
from .edits import Pending, SiteEdits
from .weight_store import WeightStore


@dataclass
class Analysis:
    """What ``analyze_invariance`` found on the untouched graph (later passes only rewrite)."""

    residual: list = field(default_factory=list)  # ResidualPlan per residual stream (R1)
    values: list = field(default_factory=list)  # ValuePlan per attention (R2)
    queries_keys: list = field(default_factory=list)  # QueryKeyPlan per attention (R3)
    down_projections: list = field(default_factory=list)  # Site per R4 input
    quantized: list = field(default_factory=list)  # sites whose weights and inputs are quantized


@dataclass
class PassContext:
    gm: fx.GraphModule
    config: QuaRotConfig
    report: Report
    lifted: LiftedConstants
    example_inputs: list = field(default_factory=list)
    analysis: Analysis = field(default_factory=Analysis)
    sites: dict[fx.Node, SiteEdits] = field(default_factory=dict)  # weight edits recorded per site
    kv_cache_inputs: set = field(default_factory=set)  # cache tensors read where K/V were rotated or quantized
    packed_chains: list = field(default_factory=list)  # PackedChain per packed-cache store (passes/kv_cache.py)
    lowering: dict[fx.Node, Pending] = field(default_factory=dict)  # 4-bit weights the lowering packs
    artifact: CompiledArtifact = field(default_factory=CompiledArtifact)  # what save and export read
    weights: WeightStore = field(init=False)  # the one way a pass reads or produces a weight

    def __post_init__(self) -> None:
        self.weights = WeightStore(self.gm, self.lifted.originals, self.fqn_of)

    def edits(self, site: Site) -> SiteEdits:
        if site.node not in self.sites:
            self.sites[site.node] = SiteEdits(site, original_weight=site.weight_node.target)
        return self.sites[site.node]

    def fqn_of(self, attr: str) -> str:
        return self.lifted.fqn_by_attr.get(attr, attr)
