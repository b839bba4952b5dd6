"""R2 (value → output, per head) and R3 (query/key after the position embedding).

Both start at an attention (a ``scaled_dot_product_attention`` call, or eager attention's
``matmul(softmax(matmul(q, kᵀ)), v)``, see :class:`Attention`) and walk the dataflow through ops
that leave the head dimension (the last one) alone: transposes of other dims, reshapes
that keep it, GQA's expand/reshape, and the KV cache's ``cat`` along the sequence.

* R2: attention mixes value rows over the sequence only, so a per-head rotation of V's
  head dimension comes out on the output unchanged. Folded into the rows of the value
  projection (``v_proj``, a slice of a fused ``qkv``, or a ``split`` of GPT2's ``c_attn``)
  and the columns of the output projection; an online cross-head Hadamard on the output
  projection's input completes QuaRot's full rotation there.
* R3: q·kᵀ is unchanged when q and k are both rotated by the same H. Queries are rotated
  at the attention input; keys right after the last op that mixes their head dimension
  (RoPE), so the KV cache stores rotated keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from quarot_fx.kernels.kv_quant import KV_DEQUANTIZE
from quarot_fx.numerics.rotations import rotation_kind
from quarot_fx.report import OnlineRotation, Region, Skip

from .graph_utils import (CACHE_STORE, Site, arg, as_site, first_arg, is_metadata_use, keeps_last_dim, label, last_dim,
                          op_name, shape)
from .graph_utils import value as node_value
from .matrices import BlockRotation, CrossHead, Rotation, build
from .edits import InputRotation, OutputTransform

HADAMARD_OP = torch.ops.quarot_fx.hadamard_transform.default


# Ops between q·kᵀ and the probabilities that multiply V. R3 leaves the scores unchanged, so
# any elementwise op on them (scaling, masking, Gemma2's tanh soft-capping) is allowed.
SOFTMAX = ("softmax", "_softmax")
SCORE_OPS = {"mul", "truediv", "div", "add", "sub", "tanh", "softmax", "_softmax", "to", "float", "type",
             "dropout", "masked_fill", "where", "clamp", "contiguous", "_to_copy"}


@dataclass
class Attention:
    """softmax(q·kᵀ …)·v found in a graph, as the SDPA op or spelled out in matmuls (eager attention).

    ``inputs`` maps "query", "key", "value" to (consumer, operand): the node that reads the
    operand (the SDPA op, or the score matmul, the key's transpose, the value matmul), so a
    pass can rewrite exactly that use. ``output`` is [..., heads, seq, head_dim].
    """

    output: fx.Node
    inputs: dict[str, tuple[fx.Node, fx.Node]]
    softmax: fx.Node | None = None  # the spelled-out form's softmax

    def operand(self, name: str) -> fx.Node:
        return self.inputs[name][1]

    def consumer(self, name: str) -> fx.Node:
        return self.inputs[name][0]

    @property
    def consumers(self) -> set[fx.Node]:
        return {consumer for consumer, _ in self.inputs.values()}


def sdpa_input(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def find_attentions(gm: fx.GraphModule) -> list[Attention]:
    """Every attention in graph order: SDPA calls, and matmul(softmax(matmul(q, kᵀ)), v)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            found.append(Attention(node, {n: (node, sdpa_input(node, i, n))
                                          for i, n in enumerate(("query", "key", "value"))}))
        elif name == "matmul":
            match = _spelled_out_attention(node)
            if match is not None:
                found.append(match)
    return found


def _is_last_two_transpose(node) -> bool:
    if not isinstance(node, fx.Node) or op_name(node) != "transpose" or shape(node) is None:
        return False
    ndim = len(shape(node))
    return sorted(d % ndim for d in node.args[1:3]) == [ndim - 2, ndim - 1]


def _spelled_out_attention(pv: fx.Node) -> Attention | None:
    """``pv = matmul(P, V)`` where P comes from softmax over the last dim of ``matmul(Q, Kᵀ)``."""
    if len(pv.args) != 2 or not all(isinstance(a, fx.Node) for a in pv.args):
        return None
    probs, v = pv.args
    current, softmax = probs, None
    for _ in range(16):
        name = op_name(current)
        if name == "matmul":
            break
        if name not in SCORE_OPS:
            return None
        if name in SOFTMAX:
            softmax = current
        scores = [a for a in current.all_input_nodes if shape(a) == shape(probs)]
        if len(scores) != 1:
            return None
        current = scores[0]
    else:
        return None
    if not softmax or len(current.args) != 2:
        return None
    q, k_t = current.args
    if not _is_last_two_transpose(k_t):
        return None
    k = k_t.args[0]
    head_dim = last_dim(q)
    if head_dim is None or last_dim(k) != head_dim or shape(v) is None or shape(k)[-2] != shape(v)[-2]:
        return None
    return Attention(pv, {"query": (current, q), "key": (k_t, k), "value": (pv, v)}, softmax)


def unmatched_softmaxes(gm: fx.GraphModule, attentions: list[Attention]) -> list[fx.Node]:
    """Softmax ops outside every recognized attention: attention-like code the passes leave alone."""
    matched = {a.softmax for a in attentions}
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and op_name(n) in SOFTMAX
            and n not in matched]


def _cache_leaves(node) -> list[fx.Node]:
    """The stored tensors behind a past-cache operand: itself, or a packed cache's codes, scales and
    zero points when it is their ``kv_dequantize`` (passes/kv_cache.py)."""
    return list(node.args[:3]) if node.target is KV_DEQUANTIZE else [node]


def _is_cache_operand(node) -> bool:
    """A past-cache tensor: a graph input, an empty tensor the first step starts from, a static
    cache's freshly allocated buffer, or a packed cache's dequantized store of those."""
    if not isinstance(node, fx.Node):
        return False
    s = shape(node)
    return all(leaf.op == "placeholder" or (s is not None and 0 in s)
               or (op_name(leaf) == "zeros" and not leaf.all_input_nodes)  # zeros rotate to zeros
               for leaf in _cache_leaves(node))


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that read the values, not a packed cache's own quantizer (it is moved behind the
    rotations and quantizers when the chain is closed)."""
    return [u for u in node.users if not u.meta.get(CACHE_STORE)]


@dataclass
class HeadPath:
    """Ops between a head-dim producer and an attention input that leave the head dim alone."""

    nodes: list[fx.Node]  # from the attention input back towards the producer
    source: fx.Node  # the first node (walking back) that touches the head dimension
    cache_inputs: list[fx.Node] = field(default_factory=list)


def walk_back(node: fx.Node) -> HeadPath:
    path = HeadPath([], node)
    current = node
    while True:
        name = op_name(current)
        if name == "cat":
            tensors = current.args[0]
            dim = arg(current, 1, "dim", 0)
            ndim = len(shape(current))
            fresh = [t for t in tensors if not _is_cache_operand(t)]
            if dim % ndim == ndim - 1 or len(fresh) != 1:
                break
            path.cache_inputs += [leaf for t in tensors if t is not fresh[0] for leaf in _cache_leaves(t)]
            path.nodes.append(current)
            current = fresh[0]
            continue
        if name == "index_copy" and len(current.args) == 4 and _is_cache_operand(current.args[0]) \
                and current.args[1] % len(shape(current)) != len(shape(current)) - 1:
            path.cache_inputs += _cache_leaves(current.args[0])  # a static store, out of place
            path.nodes.append(current)
            current = current.args[3]
            continue
        src = first_arg(current)
        if current.op in ("call_function", "call_method") and isinstance(src, fx.Node) \
                and keeps_last_dim(current, src):
            path.nodes.append(current)
            current = src
            continue
        break
    path.source = current
    return path


def only_used_along(path: HeadPath, attention: Attention) -> bool:
    """Nodes on the path feed only the path, the attention, graph outputs (the cache), or ops
    that read their shape alone (``value_states.size()`` in a dynamic-shape graph)."""
    allowed = set(path.nodes) | attention.consumers
    return all(u in allowed or u.op == "output" or is_metadata_use(u, n) for n in path.nodes for u in _users(n))


def trace_rows(node: fx.Node) -> tuple[Site, int] | None:
    """Walk back from a head split to the site producing it: (site, first output row)."""
    offset, current = 0, node
    while True:
        site = as_site(current)
        if site is not None and site.kind in ("linear", "addmm"):
            return site, offset
        name = op_name(current)
        if name == "getitem" and isinstance(current.args[0], fx.Node) and op_name(current.args[0]) in ("split", "chunk"):
            parent = current.args[0]
            pieces = _split_sizes(parent)
            if pieces is None:
                return None
            offset += sum(pieces[: current.args[1]])
            current = first_arg(parent)
            continue
        if name == "getitem":
            start = _last_dim_slice_start(current)
            if start is None:
                return None
            offset += start
            current = current.args[0]
            continue
        src = first_arg(current)
        if isinstance(src, fx.Node) and keeps_last_dim(current, src) and len(current.users) == 1:
            current = src
            continue
        return None


def _split_sizes(node: fx.Node) -> list[int] | None:
    src = first_arg(node)
    full = last_dim(src)
    dim = arg(node, 2, "dim", 0)
    if full is None or dim % len(shape(src)) != len(shape(src)) - 1:
        return None
    sizes = node.args[1]
    if op_name(node) == "chunk":
        step = -(-full // sizes)
        return [min(step, full - i) for i in range(0, full, step)]
    if isinstance(sizes, int):
        return [min(sizes, full - i) for i in range(0, full, sizes)]
    return list(sizes)


def _last_dim_slice_start(node: fx.Node) -> int | None:
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    ndim = len(shape(node.args[0]))
    if Ellipsis in index and index[-1] is not Ellipsis:
        last = index[-1]
    elif len([i for i in index if i is not None]) == ndim and Ellipsis not in index:
        last = index[-1]
    else:
        return None
    if not isinstance(last, slice) or last.step not in (None, 1):
        return None
    start = last.start or 0
    return start if start >= 0 else None


@dataclass
class ValuePlan:
    attention: Attention
    head_dim: int
    kv_heads: int = 0
    heads: int = 0
    value_site: Site | None = None
    value_rows: int = 0
    output_site: Site | None = None
    cache_inputs: list[fx.Node] = field(default_factory=list)
    problem: str | None = None


def analyze_values(attention: Attention) -> ValuePlan:
    value = attention.operand("value")
    plan = ValuePlan(attention, last_dim(value))
    path = walk_back(value)
    plan.cache_inputs = path.cache_inputs
    split = path.source
    if op_name(split) not in ("view", "reshape") and path.nodes and op_name(path.nodes[-1]) in ("view", "reshape"):
        split = path.nodes[-1]  # one KV head: [.., d] → [.., 1, d] keeps the last dim, so the walk went past it
    s_in, s_out = shape(first_arg(split)) if isinstance(first_arg(split), fx.Node) else None, shape(split)
    if op_name(split) not in ("view", "reshape") or not s_in or not s_out or len(s_out) < 2 \
            or s_out[-1] != plan.head_dim or s_in[-1] != s_out[-2] * s_out[-1]:
        plan.problem = f"no head split found on the value path (stopped at '{op_name(split)}')"
        return plan
    if not only_used_along(path, attention) or len(_users(split)) != 1:
        plan.problem = "values on the path to attention are also used elsewhere"
        return plan
    plan.kv_heads = s_out[-2]
    traced = trace_rows(first_arg(split))
    if traced is None:
        plan.problem = "the value heads do not come from a linear layer's output rows"
        return plan
    plan.value_site, plan.value_rows = traced
    # Forward: attention output → (transposes) → merge heads → output projection.
    current = attention.output
    while len(current.users) == 1 and keeps_last_dim(next(iter(current.users)), current):
        current = next(iter(current.users))
    merge = next(iter(current.users)) if len(current.users) == 1 else None
    if merge is None or op_name(merge) not in ("view", "reshape") or shape(current)[-1] != plan.head_dim \
            or last_dim(merge) != shape(current)[-2] * plan.head_dim:
        plan.problem = "the attention output does not merge its heads into one projection input"
        return plan
    plan.heads = shape(current)[-2]
    current = merge
    while len(current.users) == 1:
        user = next(iter(current.users))
        site = as_site(user)
        if site is not None and site.kind in ("linear", "addmm") and site.input_node is current:
            plan.output_site = site
            return plan
        if not keeps_last_dim(user, current):
            break
        current = user
    plan.problem = "the merged attention output does not feed a single linear layer"
    return plan


def online_rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x·Q at run time for a rotation kind without a fast online op (a dense matmul)."""
    return x @ q


def insert_rotation(gm: fx.GraphModule, consumer: fx.Node, value: fx.Node, matrix,
                    pad_to: int | None = None) -> fx.Node:
    """Insert the online transform x·M (zero-padding first if asked) on one input of ``consumer``:
    ``quarot_fx::hadamard_transform`` for Hadamard kinds (fusable with quantization), else x @ M."""
    graph = gm.graph
    kind = rotation_kind(matrix.kind)
    with graph.inserting_before(consumer):
        x = value
        if pad_to is not None and pad_to != last_dim(value):
            x = graph.call_function(torch.nn.functional.pad, (x, (0, pad_to - last_dim(value))))
        if kind.hadamard_op and isinstance(matrix, (Rotation, CrossHead)):
            rotated = graph.call_function(HADAMARD_OP, (x, matrix.size if isinstance(matrix, CrossHead) else 1))
        else:
            dtype = node_value(value).dtype if isinstance(node_value(value), torch.Tensor) else torch.float32
            name = f"qfx_online_{len([n for n in graph.nodes if n.op == 'get_attr' and 'qfx_online_' in n.target])}"
            gm.register_buffer(name, build(matrix).to(dtype))
            rotated = graph.call_function(online_rotate, (x, graph.get_attr(name)))
    consumer.replace_input_with(value, rotated)
    return rotated


def _applicable(ctx, plans, region: str, option: str):
    """(plan, where) for the plans the option's rotation kind can apply at head_dim; the rest
    become skips with their reason."""
    name = getattr(ctx.config, option)
    kind = rotation_kind(name)
    for plan in plans:
        where = label(plan.attention.output)
        if plan.problem is None and kind.problem(plan.head_dim, None):
            plan.problem = f"{kind.problem(plan.head_dim, None)} (head_dim={plan.head_dim}, {option}={name!r})"
        if plan.problem is not None:
            ctx.report.skipped.append(Skip(f"{region} at {where}", plan.problem))
            continue
        yield plan, where


def rotate_values(ctx) -> None:
    """Pass R2: per-head rotation folded into value/output projections, online cross-head part."""
    name, seed = ctx.config.r2_rotation, ctx.config.seed
    kind = rotation_kind(name)
    for plan, where in _applicable(ctx, ctx.analysis.values, "R2", "r2_rotation"):
        hd, heads = plan.head_dim, plan.heads
        rows = plan.kv_heads * hd
        ctx.edits(plan.value_site).edits.append(
            OutputTransform(BlockRotation(name, plan.kv_heads, hd, seed), plan.value_rows, plan.value_rows + rows))
        out = ctx.edits(plan.output_site)
        out.edits.append(InputRotation(BlockRotation(name, heads, hd, seed)))
        if heads > 1 and kind.problem(heads, None) is None:
            online = CrossHead(name, heads, hd, seed)
        elif kind.problem(heads * hd, None) is None:
            online = Rotation(name, heads * hd, seed)
        else:
            online = None
            ctx.report.notes.append(f"R2 at {where}: no {name} rotation of order {heads} or {heads * hd}; "
                                    "only the per-head part is applied")
        if online is not None:
            insert_rotation(ctx.gm, plan.output_site.node, plan.output_site.input_node, online)
            out.edits.append(InputRotation(online))
            out.online.append(online.describe())
            ctx.report.online.append(OnlineRotation("R2", label(plan.output_site.node), online, heads * hd))
        described = f"{name} per head ({hd})" + (f" + online {online.describe()}" if online else "")
        ctx.kv_cache_inputs.update(plan.cache_inputs)
        cache = "; KV cache holds rotated values" if plan.cache_inputs else ""
        ctx.report.regions.append(Region("R2", hd, described, where + cache))


@dataclass
class QueryKeyPlan:
    attention: Attention
    head_dim: int
    key_path: HeadPath | None = None
    problem: str | None = None


def analyze_queries_keys(attention: Attention) -> QueryKeyPlan:
    query, key = attention.operand("query"), attention.operand("key")
    plan = QueryKeyPlan(attention, last_dim(query))
    if last_dim(key) != plan.head_dim:
        plan.problem = "query and key head dims differ"
    else:
        plan.key_path = walk_back(key)
        if not only_used_along(plan.key_path, attention):
            if plan.key_path.cache_inputs:
                plan.problem = ("keys on the path to attention are also used elsewhere; rotating them at "
                                "the attention input would disagree with the cached keys")
            else:
                plan.key_path = HeadPath([], key)  # rotate right at the attention input
    return plan


def rotate_queries_keys(ctx) -> None:
    """Pass R3: the same online rotation on queries and (post-RoPE, pre-cache) keys."""
    name = ctx.config.r3_rotation
    for plan, where in _applicable(ctx, ctx.analysis.queries_keys, "R3", "r3_rotation"):
        attention, rotation = plan.attention, Rotation(name, plan.head_dim, ctx.config.seed)
        insert_rotation(ctx.gm, attention.consumer("query"), attention.operand("query"), rotation)
        path = plan.key_path
        consumer = path.nodes[-1] if path.nodes else attention.consumer("key")
        insert_rotation(ctx.gm, consumer, path.source, rotation)
        ctx.kv_cache_inputs.update(path.cache_inputs)
        cache = "; KV cache holds rotated keys" if path.cache_inputs else ""
        ctx.report.regions.append(Region("R3", plan.head_dim, f"online {name} on query and key", where + cache))
        ctx.report.online.append(OnlineRotation("R3", where, rotation, plan.head_dim))
