"""Learned rotations (SpinQuant): R1 and each layer's per-head R2 fitted to the quantized network.

The rotation passes recorded *where* R1 and R2 live (edits on the residual stream's writers and
readers, on each attention's value rows and output projection) and the quantization passes put
fake quantizers on the activations and the KV cache. This pass replaces those fixed matrices by
learned ones: it runs the graph on calibration windows with every edited weight computed from the
current matrices (so gradients reach them), the quantizers' rounding passed straight through, and
takes Cayley SGD steps that keep each matrix orthogonal (``numerics/stiefel.py``). Nothing is
model-specific: whatever the passes rotate is what is learned. Then each edit's matrix becomes a
:class:`~quarot_fx.passes.matrices.Learned` one, and materialization folds it like a Hadamard
(exact in float). R3/R4 and R2's cross-head part stay online Hadamards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from quarot_fx.numerics.stiefel import cayley_step, orthogonality_error, reorthogonalize
from quarot_fx.report import Skip

from .attention_rotations import per_head_rotations
from .clip_search import QUANTIZERS, _cross_entropy, _logits
from .edits import InputRotation, OutputTransform, QuantizeWeight, SiteEdits, quantizes_last
from .graph_utils import as_site
from .matrices import Learned, build
from .residual import inverse_name, residual_rotation
from .surgery import side_effects
from .weight_store import apply_edits
from .windows import Windows, ancestors, last_uses, sequence_length_inputs


@dataclass
class Target:
    """One learned matrix: its name (stable across processes: saved artifacts key by it), its
    initial value, and the edits that hold it (entry, index in the entry's edits, blocks)."""

    name: str
    init: torch.Tensor
    places: list[tuple[SiteEdits, int, int]] = field(default_factory=list)
    inverse: tuple[str, int] | None = None  # R1: (buffer of R1ᵀ for escaping values, stream width d)


def _find(ctx, site, kind, matrix, blocks: int, places: list) -> None:
    entry = ctx.sites.get(site.node)
    for i, edit in enumerate(entry.edits if entry is not None else ()):
        if isinstance(edit, kind) and edit.matrix == matrix:
            places.append((entry, i, blocks))


def learning_targets(ctx) -> list[Target]:
    """R1 per rotated residual stream and R2 per rotated attention, where their edits are."""
    config, targets = ctx.config, []
    for plan in ctx.analysis.residual if config.r1 else ():
        if not plan.valid:
            continue
        rotation = residual_rotation(config, plan.width or plan.size)
        target = Target(f"R1 {ctx.fqn_of(as_site(plan.seed).weight_node.target)}", build(rotation))
        for site in plan.writers:
            _find(ctx, site, OutputTransform, rotation, 1, target.places)
        for site, _value in plan.readers:
            _find(ctx, site, InputRotation, rotation, 1, target.places)
        if plan.escapes and hasattr(ctx.gm, inverse_name(plan)):
            target.inverse = (inverse_name(plan), plan.size)
        if target.places:
            targets.append(target)
    for plan in ctx.analysis.values if config.r2 else ():
        if plan.problem is not None:
            continue
        value_part, output_part = per_head_rotations(config, plan)
        fqn = ctx.fqn_of(plan.value_site.weight_node.target)
        target = Target(f"R2 {fqn}:{plan.value_rows}", build(replace(value_part, blocks=1)))
        _find(ctx, plan.value_site, OutputTransform, value_part, plan.kv_heads, target.places)
        _find(ctx, plan.output_site, InputRotation, output_part, plan.heads, target.places)
        if len(target.places) == 2:
            targets.append(target)
    return targets


def _substituted(targets: list[Target], matrices: dict[str, torch.Tensor], digest: str | None = None) -> dict:
    """{id(entry): (entry, its edits with every target's matrix replaced by ``matrices[name]``)}
    (``digest`` given: live tensors, not hashed; else each matrix is hashed once)."""
    edits: dict[int, tuple[SiteEdits, list]] = {}
    learned: dict[tuple[str, int], Learned] = {}
    for target in targets:
        tensor = matrices[target.name]
        for entry, i, blocks in target.places:
            if (target.name, blocks) not in learned:
                learned[target.name, blocks] = (Learned(target.name, blocks, tensor.shape[0], digest, tensor)
                                                if digest is not None else Learned.of(target.name, blocks, tensor))
            new = edits.setdefault(id(entry), (entry, list(entry.edits)))[1]
            new[i] = replace(entry.edits[i], matrix=learned[target.name, blocks])
    return edits


def _stored(entry: SiteEdits, edits: list, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A site's weight and bias (stored layout) from ``edits``, differentiable in live matrices; an
    RTN weight quantization passes its rounding straight through (with its per-row clip search:
    without it the learning fits a network 1.4 nats worse than the one it is for)."""
    site = entry.site
    weight = ctx.weights.tensor(site.weight_node.target)
    bias = ctx.weights.tensor(site.bias_node.target) if site.bias_node is not None else None
    last = edits.pop() if quantizes_last(entry) else None
    w, b = apply_edits(entry, weight, bias, edits)
    if isinstance(last, QuantizeWeight):  # (GPTQ/OBR quantize the learned weights afterwards: float here)
        rounded, _ = last.apply(w.detach(), None)
        w = w + (rounded - w.detach())
    return site.from_logical(w.to(weight.dtype)), b


class _Forward:
    """The graph on one calibration window with site weights given per call: the loss and its graph."""

    def __init__(self, ctx, windows: Windows):
        self.ctx, self.windows = ctx, windows
        self.logits = _logits(ctx.gm)
        order = list(ctx.gm.graph.nodes)
        needed = ancestors([self.logits] + [n for n in order[:order.index(self.logits)] if side_effects(n)])
        self.nodes = [n for n in order if n in needed]
        self.last_use = last_uses(self.nodes)
        self.labels = [chunk[..., 1:].reshape(-1) for chunk in windows.chunks]

    def loss(self, window: int, weights: dict[fx.Node, dict], values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy; ``weights[site node]`` maps its weight/bias nodes to
        tensors; ``values[node]`` replaces a node's value (an explicit inverse rotation)."""
        env: dict = {}
        for i, node in enumerate(self.nodes):
            if node in values:
                env[node] = values[node]
            elif node in weights:
                given = weights[node]
                args = fx.node.map_arg(node.args, lambda n: given[n] if n in given else env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: given[n] if n in given else env[n])
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_function" and node.target in QUANTIZERS:  # rounding: straight through
                x = env[node.args[0]]
                env[node] = x + (self.windows.value(window, node, env) - x).detach()
            else:
                env[node] = self.windows.value(window, node, env)
            for used in node.all_input_nodes:
                if self.last_use[used] == i and used is not self.logits:
                    env.pop(used, None)
        labels = self.labels[window]
        return _cross_entropy(env[self.logits], labels) / labels.numel()


def _site_weights(entry: SiteEdits, weight: torch.Tensor, bias) -> dict:
    given = {entry.site.weight_node: weight}
    if entry.site.bias_node is not None and bias is not None:
        given[entry.site.bias_node] = bias.to(weight.dtype)
    return given


def _learning_length(ctx, windows: Windows) -> int | None:
    """``learn_tokens`` (at most a calibration tensor's length) if the graph runs another sequence
    length than it was compiled for, else None (the compiled length)."""
    wanted = ctx.config.learn_tokens
    if wanted is None or sequence_length_inputs(ctx.gm.graph, windows.tokens_node) is None:
        return None
    rows = math.prod(windows._inputs[windows.tokens_node].shape[:-1])
    return min(wanted, max(t.numel() for t in ctx.config.calibration) // rows)


def _logits_for_every_token(gm: fx.GraphModule, tokens: fx.Node) -> bool:
    """The graph returns logits at every position (a forward; generate() keeps only the last)."""
    logits, ids = _logits(gm).meta.get("example_value"), tokens.meta.get("example_value")
    return (isinstance(logits, torch.Tensor) and isinstance(ids, torch.Tensor) and logits.dim() >= 2
            and str(logits.shape[-2]) == str(ids.shape[-1]))


def _in_float64(matrices: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The learned matrices in float64, orthogonal to float64 precision (QR's orthogonal factor,
    which moves a float32-learned R by ~1e-7): the fold takes Rᵀ as R's inverse, so a float64 model
    then computes what it computed unrotated to 1e-12, not to the float32 matrix's 1e-6."""
    return None if matrices is None else {name: reorthogonalize(m.detach().double()) for name, m in matrices.items()}


def learn(ctx, targets: list[Target]) -> dict[str, torch.Tensor] | None:
    """Cayley SGD on the targets' matrices; None when the graph has no token input or logits."""
    config = ctx.config
    probe = Windows(ctx, 0)
    if probe.tokens_node is None or _logits(ctx.gm) is None or not _logits_for_every_token(ctx.gm, probe.tokens_node):
        return None
    length = _learning_length(ctx, probe)
    windows = Windows(ctx, config.learn_windows, length)
    if not windows.chunks:
        raise ValueError(f"learn_rotations: the calibration text ({sum(t.numel() for t in config.calibration)} "
                         f"tokens) holds no window of the compiled shape {tuple(probe._inputs[probe.tokens_node].shape)}")
    forward = _Forward(ctx, windows)
    matrices = {t.name: t.init.clone() for t in targets}
    live_entries = {id(entry) for t in targets for entry, _, _ in t.places}
    fixed = {}  # sites with edits but no learned matrix: computed once
    for entry in ctx.sites.values():
        if id(entry) not in live_entries and entry.edits:
            fixed[entry.site.node] = _site_weights(entry, *ctx.weights.float(entry))
    inverse_nodes = {t.name: [n for n in forward.nodes if n.op == "get_attr" and n.target == t.inverse[0]]
                     for t in targets if t.inverse}
    losses = []
    bar = tqdm(range(config.learn_steps), desc="learning rotations", leave=False)
    for step in bar:
        live = {name: m.float().requires_grad_() for name, m in matrices.items()}
        with torch.enable_grad():
            weights = dict(fixed)
            for entry, edits in _substituted(targets, live, digest="live").values():
                weights[entry.site.node] = _site_weights(entry, *_stored(entry, edits, ctx))
            values = {node: live[t.name].T[:, :t.inverse[1]].contiguous()
                      for t in targets if t.inverse for node in inverse_nodes[t.name]}
            loss = forward.loss(step % len(windows.chunks), weights, values)
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        rate = config.learn_lr * (1 - step / config.learn_steps)
        for (name, r), g in zip(matrices.items(), grads):
            if g is not None:
                matrices[name] = cayley_step(r, g.to(r.dtype), rate)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    record = ctx.report
    if losses:
        k = min(len(losses), len(windows.chunks))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        record.notes.append(f"learned rotations: {len(targets)} matrices, {config.learn_steps} Cayley SGD steps "
                            f"(lr {config.learn_lr}) on {len(windows.chunks)} calibration windows of "
                            f"{windows.chunks[0].shape[-1]} tokens; quantized loss {first:.4f} → {last:.4f} "
                            f"(mean of the first and last {k} steps)")
        record.counters["learn_steps"] += config.learn_steps
    if length is None and config.learn_tokens is not None and windows.chunks[0].shape[-1] != config.learn_tokens:
        record.notes.append(f"learn_tokens={config.learn_tokens}: the graph was compiled for "
                            f"{windows.chunks[0].shape[-1]} tokens and takes no other length, so the windows "
                            "have that length")
    return matrices


def learn_rotations(ctx) -> None:
    """Pass: learn (or restore from a saved artifact) R1 and R2, and put them in the edits."""
    targets = learning_targets(ctx)
    if not targets:
        ctx.report.skipped.append(Skip("learned rotations", "no R1 or R2 rotation was applied to learn"))
        return
    saved = ctx.config.calibrated
    if saved is not None and (saved.rotations or ctx.config.calibration is None):
        matrices = {t.name: saved.get("rotations", t.name) for t in targets}
        ctx.report.notes.append(f"learned rotations: {len(targets)} matrices restored from a saved artifact")
    else:
        # once per model and options: every graph of the model (prefill, decode, a new batch size)
        # must fold the same matrices, or the KV cache would hold values in another basis
        anchor = ctx.weights.tensor(targets[0].places[0][0].original_weight)
        key = ("learned rotations", tuple(t.name for t in targets), ctx.config.calibration_id(), ctx.config)
        if ctx.weights.has_memo(anchor, key):
            ctx.report.notes.append("learned rotations: the matrices this model learned at its first compile")
        matrices = ctx.weights.memo(anchor, key, lambda: _in_float64(learn(ctx, targets)))
        if matrices is None:
            ctx.report.skipped.append(Skip("learned rotations", "the model's first compiled graph has no token-id "
                                           "input or no logits at every position (generate() keeps the last); "
                                           "the configured rotations are kept for every graph of this model: "
                                           "call the compiled model on a batch of tokens first"))
            return
    for target in targets:
        error = orthogonality_error(matrices[target.name].double())
        if not math.isfinite(error) or error > 1e-5:
            raise RuntimeError(f"learned rotation {target.name} is not orthogonal (max |RᵀR − I| = {error:.2e})")
    for entry, edits in _substituted(targets, matrices).values():
        entry.edits[:] = edits
    learned_kinds = {t.name.split()[0] for t in targets}
    for region in ctx.report.regions:
        if region.kind in learned_kinds:
            region.rotation = f"learned (from {region.rotation})"
    for target in targets:
        ctx.artifact.calibrated.rotations[target.name] = matrices[target.name].double()
        if target.inverse is not None:
            name, size = target.inverse
            setattr(ctx.gm, name, matrices[target.name].T[:, :size].contiguous().to(getattr(ctx.gm, name).dtype))
