"""The R2 (value → output, per head) and R3 (query/key) rewrites, on what ``attention.py`` found.

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

from quarot_fx.numerics.rotations import rotation_kind
from quarot_fx.compiled import OnlineRotation
from quarot_fx.report import Region, Skip

from .edits import InputRotation, OutputTransform
from .graph_utils import label
from .matrices import BlockRotation, CrossHead, Rotation
from .online import insert_rotation


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


def per_head_rotations(config, plan) -> tuple[BlockRotation, BlockRotation]:
    """R2's per-head part on the value rows (one block per KV head) and on the output projection's
    input (one per query head): the same head_dim rotation."""
    name, seed, hd = config.r2_rotation, config.seed, plan.head_dim
    return BlockRotation(name, plan.kv_heads, hd, seed), BlockRotation(name, plan.heads, hd, seed)


def rotate_values(ctx) -> None:
    """Pass R2: per-head rotation folded into value/output projections, online cross-head part."""
    name, seed = ctx.config.r2_rotation, ctx.config.seed
    kind = rotation_kind(name)
    for plan, where in _applicable(ctx, ctx.analysis.values, "R2", "r2_rotation"):
        hd, heads = plan.head_dim, plan.heads
        rows = plan.kv_heads * hd
        value_part, output_part = per_head_rotations(ctx.config, plan)
        ctx.edits(plan.value_site).edits.append(OutputTransform(value_part, plan.value_rows, plan.value_rows + rows))
        out = ctx.edits(plan.output_site)
        out.edits.append(InputRotation(output_part))
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
            out.edits.append(InputRotation(online, online=True))
            out.online.append(online.describe())
            ctx.artifact.online.append(OnlineRotation("R2", label(plan.output_site.node), online, heads * hd))
        described = f"{name} per head ({hd})" + (f" + online {online.describe()}" if online else "")
        ctx.kv_cache_inputs.update(plan.cache_inputs)
        cache = "; KV cache holds rotated values" if plan.cache_inputs else ""
        ctx.report.regions.append(Region("R2", hd, described, where + cache))


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
        ctx.artifact.online.append(OnlineRotation("R3", where, rotation, plan.head_dim))
