"""Gradual binary search (GBS) of activation and KV clip ratios (METHODS.md; arXiv 2504.13989).

Weights are quantized first (RTN or GPTQ, as configured). Every searched quantizer starts off
(float). Walking the graph in order, the current quantizer is switched on, its clip ratio found
by a bounded binary search, frozen, and the walk goes on: later sites are searched with the
earlier ones quantized ("gradual"). There is one clip per quantized input, so q/k/v (and
gate/up) share theirs: a quantize-once kernel reads one clip.

The walk is :class:`~.calibrate.Windows`: node by node over the calibration windows, so the
frozen prefix's values are cached and a candidate clip costs only what comes after the site:

* ``gbs_objective="loss"`` (default): cross-entropy of the rest of the network on the windows;
* ``"local"``: relative squared error, against the site left in float, of the first linear
  outputs the site reaches (q/k/v for their input, o_proj for K and V): a fraction of the cost.
  At activation sites that error is a sum over tokens (each linear acts on each token alone), so
  ``gbs_tokens`` positions per window estimate it; K/V errors pass through attention: all tokens;
* ``"fisher"``: the loss change to second order, Σ g²·(Q(x) − x)² over the site's values, with g
  the gradient of the calibration loss at the site (diagonal empirical Fisher, as BRECQ weighs
  its reconstruction error). One forward and backward with every searched site in float gives
  every g; a candidate then costs one quantization of the site's input and nothing after it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from quarot_fx.numerics.quant import quantize_activation, quantize_kv
from quarot_fx.report import ClipRecord, Skip

from .windows import Windows, ancestors, last_uses, linear_override
from .graph_utils import as_site, label
from .lowering import PendingWeight
from .quantize import RECORD

QUANTIZERS = (quantize_activation, quantize_kv)


def searched_quantizers(gm: fx.GraphModule, config) -> list[fx.Node]:
    wanted = {quantize_activation: config.a_clip == "gbs", quantize_kv: config.kv_clip == "gbs"}
    return [n for n in gm.graph.nodes if n.op == "call_function" and wanted.get(n.target, False)]


def binary_search(objective, iterations: int, tolerance: float = 1e-3) -> tuple[float, dict[float, float]]:
    """GBS's bounded search on (0, 1]: start a=0, m=0.5, b=1; each step evaluates the midpoints
    of both halves and keeps the half around the better one. Returns the best clip evaluated
    (1.0 included, so clipping is never chosen over not clipping unless it helps)."""
    seen: dict[float, float] = {}

    def f(c):
        if c not in seen:
            seen[c] = objective(c)
        return seen[c]

    a, m, b = 0.0, 0.5, 1.0
    f(1.0)
    f(m)
    for _ in range(iterations):
        if b - a < tolerance:
            break
        left, right = (a + m) / 2, (m + b) / 2
        if f(left) <= f(right):
            a, m, b = a, left, m
        else:
            a, m, b = m, right, b
    best = min(seen, key=lambda c: (seen[c], -c))
    return best, seen


def _quantize(node: fx.Node, clip: float | None):
    """The quantizer's value from an environment: off (``None``: float) or at ``clip``."""
    def compute(env):
        x = env[node.args[0]]
        return x if clip is None else node.target(x, node.args[1], clip)

    return compute


def _logits(gm: fx.GraphModule) -> fx.Node | None:
    """The graph output with the widest last dimension (the vocabulary)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    best = None
    for node in out.all_input_nodes:
        v = node.meta.get("example_value")
        if isinstance(v, torch.Tensor) and v.ndim >= 2 and (best is None or v.shape[-1] > best[1]):
            best = (node, v.shape[-1])
    return None if best is None else best[0]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one window (``labels``: its tokens after the first)."""
    return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(labels.numel(), -1).float(), labels,
                                             reduction="sum")


def _first_linears(node: fx.Node) -> list[fx.Node]:
    """The first linear/addmm sites reached from ``node`` going forward."""
    found, frontier, seen = [], list(node.users), set()
    while frontier:
        user = frontier.pop()
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        site = as_site(user)
        if site is not None and site.kind != "embedding":
            found.append(user)
        else:
            frontier.extend(user.users)
    return found


def _quantized_weights(ctx, windows: Windows) -> None:
    """Sites whose 4-bit weights the lowering will pack still read float weights in the graph:
    compute them from the packed codes, read as the lowering reads them (cached: it reuses them)."""
    for node in ctx.lowering:
        weight = PendingWeight.of(ctx, node)
        windows.override[node] = linear_override(weight.entry.site, weight.dequantized(), weight.bias)


def _squared_loss_gradients(windows: Windows, quantizers, nodes, logits, labels) -> list[dict]:
    """Per window, g² at each quantizer's value: the gradient of the calibration cross-entropy
    with every searched quantizer in float (a zero probe added at each one collects its g) and
    the others quantized, passing gradients straight through their rounding."""
    searched, last_use = set(quantizers), last_uses(nodes)
    squares = []
    for w in tqdm(range(len(windows.runners)), desc="GBS loss gradients", leave=False):
        env, probes = {}, {}
        with torch.enable_grad():
            for i, node in enumerate(nodes):
                if node in searched:
                    x = env[node.args[0]]
                    probes[node] = torch.zeros_like(x, requires_grad=True)
                    env[node] = x + probes[node]
                elif node.op == "call_function" and node.target in QUANTIZERS:  # rounding: straight through
                    x = env[node.args[0]]
                    env[node] = x + (windows.value(w, node, env) - x).detach()
                else:
                    env[node] = windows.value(w, node, env)
                for used in node.all_input_nodes:
                    if last_use[used] == i and used is not logits:
                        env.pop(used, None)
            grads = torch.autograd.grad(_cross_entropy(env[logits], labels[w]), list(probes.values()),
                                        allow_unused=True)
        squares.append({q: torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float().square()
                        for (q, p), g in zip(probes.items(), grads)})
    return squares


def _site_of(q: fx.Node) -> tuple[str, str]:
    """(site, what) naming a quantizer in the report and in saved artifacts."""
    if RECORD in q.meta:
        return q.meta[RECORD].site, q.meta[RECORD].what
    return label(q), "activation" if q.target is quantize_activation else "kv"


def _set_clip(ctx, q: fx.Node, site: str, what: str, clip: float) -> None:
    q.args = (q.args[0], q.args[1], clip)
    if RECORD in q.meta:
        q.meta[RECORD].clip = clip
    ctx.report.clips.append(ClipRecord(site, what, clip))
    ctx.artifact.calibrated.clips[site, what] = clip


def search_clips(ctx) -> None:
    """Pass: GBS clip per searched quantizer, written into the graph and the report."""
    config, gm = ctx.config, ctx.gm
    quantizers = searched_quantizers(gm, config)
    if not quantizers:
        return
    if config.calibrated is not None and (config.calibrated.clips or config.calibration is None):
        # a loaded artifact: the clips it was searched to (given none, and calibration text, search)
        for q in quantizers:
            site, what = _site_of(q)
            _set_clip(ctx, q, site, what, config.calibrated.get("clips", (site, what)))
        ctx.report.notes.append(f"GBS: {len(quantizers)} clips restored from a saved artifact (no search)")
        return
    windows = Windows(ctx, config.gbs_windows)
    logits = _logits(gm)
    if windows.tokens_node is None or logits is None:
        ctx.report.skipped.append(Skip("clip search (gbs)", "no token-id input or no logits output found; "
                                       "the default clips are kept"))
        return
    _quantized_weights(ctx, windows)
    for q in quantizers:
        windows.override[q] = _quantize(q, None)  # not searched yet: float
    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    needed = ancestors([logits])
    labels = [chunk[..., 1:].reshape(-1) for chunk in windows.chunks]
    bar = tqdm(total=len(quantizers), desc="GBS clip search", leave=False)

    def evaluate(q, clip, nodes, score, rows=None) -> float:
        total = 0.0
        for w, runner in enumerate(windows.runners):
            env = dict(runner.env)
            if rows is not None:  # a subset of the token positions (per-token sites only)
                env[q.args[0]] = env[q.args[0]].index_select(-2, rows[w])
            env[q] = _quantize(q, clip)(env)
            for node in nodes:
                env[node] = windows.value(w, node, env)
            total += score(w, env)
        return total

    def loss(w, env):
        return _cross_entropy(env[logits], labels[w]).item()

    def token_subset(q, nodes, targets) -> list[torch.Tensor] | None:
        """Positions the local objective uses per window: all (None), or ``gbs_tokens`` of them at
        an activation site whose replayed nodes are only the linears it feeds (each token alone)."""
        x = windows.runners[0].env.get(q.args[0])
        if (config.gbs_tokens is None or q.target is not quantize_activation or set(nodes) - set(targets)
                or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] <= config.gbs_tokens):
            return None
        g = torch.Generator().manual_seed(len(ctx.report.clips))  # fixed per site: every candidate sees the same
        return [torch.randperm(x.shape[-2], generator=g)[:config.gbs_tokens].sort().values.to(x.device)
                for _ in windows.runners]

    if config.gbs_objective == "fisher":
        fisher = _squared_loss_gradients(windows, quantizers, [n for n in order if n in needed], logits, labels)

    def fisher_error(q, clip) -> float:
        total = 0.0
        for w, runner in enumerate(windows.runners):
            x = runner.env[q.args[0]]
            total += (_quantize(q, clip)(runner.env) - x).float().square().mul_(fisher[w][q]).sum().item()
        return total

    def search(q):
        if config.gbs_objective == "loss":
            nodes = [n for n in order[position[q] + 1:] if n in needed]
            objective = lambda c: evaluate(q, c, nodes, loss)  # noqa: E731
        elif config.gbs_objective == "fisher":
            objective = lambda c: fisher_error(q, c)  # noqa: E731
        else:
            targets = _first_linears(q)
            last = max(position[t] for t in targets)
            feeding = ancestors(targets)
            nodes = [n for n in order[position[q] + 1:last + 1] if n in feeding]
            reference: dict[int, dict] = {}

            def record_reference(w, env):
                reference[w] = {t: env[t] for t in targets}
                return 0.0

            rows = token_subset(q, nodes, targets)
            ctx.report.counters["gbs_token_subsets"] += rows is not None
            evaluate(q, None, nodes, record_reference, rows)
            norm = sum(r[t].float().pow(2).sum().item() for r in reference.values() for t in targets) or 1.0

            def error(w, env):
                return sum((env[t] - reference[w][t]).float().pow(2).sum().item() for t in targets) / norm

            objective = lambda c: evaluate(q, c, nodes, error, rows)  # noqa: E731
        clip, _ = binary_search(objective, config.gbs_iterations)
        windows.override[q] = _quantize(q, clip)
        _set_clip(ctx, q, *_site_of(q), clip)
        bar.update()

    searched = set(quantizers)
    windows.run([n for n in order if n in needed], lambda node: search(node) if node in searched else None)
    bar.close()
    ctx.report.counters["gbs_windows"] += len(windows.chunks)
    ctx.report.notes.append(f"GBS: {len(quantizers)} clips searched ({config.gbs_objective} objective, "
                            f"{len(windows.chunks)} calibration windows, {config.gbs_iterations} iterations)")
