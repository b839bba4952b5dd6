"""Attention, found from the dataflow: where R2 (value → output, per head) and R3 (query/key after
the position embedding) can live. The rewrites are in ``attention_rotations.py``.

An attention is a ``scaled_dot_product_attention`` call, or eager attention's
``matmul(softmax(matmul(q, kᵀ)), v)`` (see :class:`Attention`). From it the walks go through ops
that leave the head dimension (the last one) alone: transposes of other dims, reshapes that keep
it, GQA's expand/reshape, and the KV cache's ``cat`` along the sequence.

* R2: attention mixes value rows over the sequence only, so a per-head rotation of V's head
  dimension comes out on the output unchanged (``analyze_values`` finds the value projection's
  rows: ``v_proj``, a slice of a fused ``qkv``, or a ``split`` of GPT2's ``c_attn``).
* R3: q·kᵀ is unchanged when q and k are both rotated by the same H (``analyze_queries_keys``
  finds the last op that mixes the keys' head dimension, RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from quarot_fx.kernels.kv_quant import KV_DEQUANTIZE

from .graph_utils import (CACHE_STORE, Site, arg, as_site, first_arg, is_metadata_use, keeps_last_dim, last_dim, op_name,
                          shape)


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
