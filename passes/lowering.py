"""The lowerings: the quantization decisions recorded on the graph become ops that compute them.

* ``lower_to_integer_kernels`` (``kernels="integer"``): pending 4-bit weights (``ctx.lowering``)
  are packed and their sites swapped for ``quantized_linear`` (or its sparse twin); fake
  activation and KV quantizers become the ``quarot_fx::`` integer ops, the activation quantizer
  fused with the online Hadamard before it;
* ``lower_to_simulated_linears`` (``kernels="fake"``): the same arithmetic in plain torch ops
  (exact products of float codes, then the scales), so both paths give the same bits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from quarot_fx.kernels import int_gemm
from quarot_fx.kernels.kv_quant import KV_DEQUANTIZE, KV_QUANTIZE
from quarot_fx.kernels.quantized_linear import accumulator_dtype, simulated_linear, unpack_linear_weight
from quarot_fx.kernels.sparse_linear import compress
from quarot_fx.numerics.quant import activation_codes, dequantize_weight, quantize_activation, quantize_kv
from quarot_fx.report import QuantRecord

from .online import HADAMARD_OP
from .edits import SiteEdits
from .graph_utils import label, size_hint
from .materialize import record_final_weight
from .quantize import KV_LIKE, RECORD
from .sparsity import prunes, record_sparsity, storage_format
from .surgery import (INTEGER_LINEARS, QUANTIZED_LINEAR, drop_unused_constants, integer_linear_shape,
                      replace_with_quantized_linear, replace_with_simulated_linear)

QUANTIZE_PER_TOKEN = torch.ops.quarot_fx.quantize_per_token.default


def _integer_kv(graph: fx.Graph, source: fx.Node, bits: int, clip: float, like) -> fx.Node:
    """kv_dequantize(kv_quantize(source)): the codes a packed cache would hold, read back."""
    quantized = graph.call_function(KV_QUANTIZE, (source, bits, clip))
    parts = [graph.call_function(operator.getitem, (quantized, i)) for i in range(3)]
    return graph.call_function(KV_DEQUANTIZE, (*parts, bits, like.shape[-1], like.dtype))


def _decide_gemm(report, linear: fx.Node, source: fx.Node, config) -> None:
    """Choose (or read the ``int_gemm`` option for) the CPU's integer GEMM for this linear at the
    compiled number of rows (this call's, when the graph serves any) and at one row (decode), so
    the report says what will run; the kernel makes the same cached decision at run time for any
    other row count (with packed resident weights, each call's unpacking counted)."""
    like = source.meta.get("example_value")
    if not isinstance(like, torch.Tensor) or like.device.type != "cpu":
        return
    rows = size_hint(like.numel() // like.shape[-1])  # symbolic: this call's rows, without a guard
    if rows is None:
        return
    in_features, out_features, groups = integer_linear_shape(linear)
    for m in dict.fromkeys((rows, 1)):
        decision = int_gemm.decide(m, in_features, out_features, in_features // groups, config.int_gemm,
                                   int4=linear.target is QUANTIZED_LINEAR,  # sparse storage: not the int4 kernels
                                   unpacks=config.resident_weights == "packed")
        if decision not in report.gemm:
            report.gemm.append(decision)


def _fake_quantizers_feeding(graph: fx.Graph, targets: tuple):
    """(fake activation quantizer, the ``targets`` calls that read it as their float input)."""
    for fake in [n for n in graph.nodes if n.op == "call_function" and n.target is quantize_activation]:
        linears = [u for u in fake.users if u.target in targets and u.args[0] is fake and u.args[1] is None]
        if linears:
            yield fake, linears


def _feed_codes(graph: fx.Graph, fake: fx.Node, linears: list, quantizer, args: tuple, storage: str) -> bool:
    """Hand ``linears`` the (codes, scales) of ``quantizer(*args)`` in place of the fake
    quantizer's output; the fake quantizer goes when nothing else reads it (returns whether)."""
    with graph.inserting_before(fake):
        quantized = graph.call_function(quantizer, args)
        codes, scales = (graph.call_function(operator.getitem, (quantized, i)) for i in range(2))
    for linear in linears:
        linear.args = (codes, scales, *linear.args[2:])
    if RECORD in fake.meta:
        fake.meta[RECORD].storage = storage
    if fake.users:
        return False
    graph.erase_node(fake)
    return True


@dataclass
class PendingWeight:
    """A weight the lowering receives as codes (``ctx.lowering``): packed int4 and scales.
    The one reader of that packing: the lowerings and GBS's search see the same weight."""

    entry: SiteEdits
    record: QuantRecord
    module: str
    fqn: str
    packed: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    in_features: int

    @classmethod
    def of(cls, ctx, node: fx.Node) -> PendingWeight:
        entry, record = ctx.lowering[node]
        fqn = ctx.fqn_of(entry.original_weight)
        return cls(entry, record, label(node, default=fqn.rpartition(".")[0]), fqn, *ctx.weights.packed(entry))

    def codes(self) -> torch.Tensor:
        return unpack_linear_weight(self.packed, self.in_features, self.scales.shape[1])

    def dequantized(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales)


def _pending_weights(ctx):
    """Each weight kept as codes, taken off its node and recorded in the report (its final codes,
    unpacked when asked; its sparsity, counted from what is stored)."""
    for node in [n for n in ctx.gm.graph.nodes if n in ctx.lowering]:
        weight = PendingWeight.of(ctx, node)
        del ctx.lowering[node]
        record_final_weight(ctx, weight.module, weight.entry, bias=weight.bias,
                            codes=lambda w=weight: (w.codes(), w.scales))
        if prunes(weight.entry):
            record_sparsity(ctx.report, weight.codes(), weight.entry.edits[-1])
        yield weight


def lower_to_simulated_linears(ctx) -> None:
    """Pass (``kernels="fake"``): a 4-bit linear with quantized inputs (``keeps_codes``) becomes
    ``simulated_linear``, the integer kernels' arithmetic in plain torch ops (exact products of
    float codes, then the scales), fed by ``activation_codes``; so the simulated path gives the
    integer path's bits on any device and through any lowering."""
    graph = ctx.gm.graph
    for weight in _pending_weights(ctx):
        ctx.report.linear(weight.module, weight.entry.site.kind, weight.fqn).online.append(
            "simulated_linear: float codes + scales")
        group = weight.in_features // weight.scales.shape[1]
        replace_with_simulated_linear(ctx.gm, weight.entry, weight.codes().to(accumulator_dtype(group)), weight.scales,
                                      weight.bias)
        weight.record.storage = "float codes"
    for fake, linears in _fake_quantizers_feeding(graph, (simulated_linear,)):
        _feed_codes(graph, fake, linears, activation_codes, fake.args, "float codes")
    drop_unused_constants(ctx.gm)


def lower_to_integer_kernels(ctx) -> None:
    """Pass: the quantization decisions recorded on the graph become integer custom ops.

    Weights: a pending 4-bit weight quantization becomes ``quantized_linear`` on packed int4
    weights and scales (packing cached per parameter), or ``sparse_quantized_linear`` on the
    compressed codes when the weight was pruned (2:4, or a bitmap). Activations: a fake per-token quantizer
    feeding those linears becomes ``quantize_per_token``, fused with the online Hadamard right
    before it. KV cache: a fake KV quantizer becomes ``kv_dequantize(kv_quantize(·))``.
    """
    graph, report = ctx.gm.graph, ctx.report
    packed_bytes = fp16_bytes = 0
    for weight in _pending_weights(ctx):
        entry, packed, scales, in_features = weight.entry, weight.packed, weight.scales, weight.in_features
        weights, extra, storage = {"weight": packed}, (), "packed int4"
        if prunes(entry):
            fmt, kept = storage_format(entry.edits[-1], in_features)
            values, meta = compress(weight.codes(), fmt, kept)
            weights, extra, storage = {"values": values, "meta": meta}, (fmt, kept), f"sparse int4 ({fmt})"
        size = sum(t.numel() for t in weights.values()) + scales.numel() * scales.element_size()
        packed_bytes += size
        fp16_bytes += 2 * packed.shape[0] * in_features
        op = "quantized_linear" if "weight" in weights else "sparse_quantized_linear"
        report.linear(weight.module, entry.site.kind, weight.fqn).online.append(
            f"{op}: {storage} weight + scales, {size / 1024:.1f} KiB")
        replace_with_quantized_linear(ctx.gm, entry, weights, scales, weight.bias, in_features, extra,
                                      ctx.config.int_gemm, ctx.config.resident_weights == "unpacked")
        weight.record.storage = storage
    report.counters["packed_bytes"] += packed_bytes
    report.counters["packed_fp16_bytes"] += fp16_bytes
    if packed_bytes:
        report.notes.append(f"integer kernels: quantized linears hold {packed_bytes / 2**20:.2f} MiB "
                            f"{'compressed sparse' if report.counters['sparse_linears'] else 'packed'} "
                            f"int4 + scales, {packed_bytes / fp16_bytes:.3f}× their fp16 size")
    if any(r.what == "weight" and r.storage == "simulated" for r in report.quantized):
        report.notes.append(f"integer kernels cover 4-bit weights: w{ctx.config.w_bits} linears run "
                            "simulated (dequantized float weights)")

    fused = 0
    for fake, linears in _fake_quantizers_feeding(graph, INTEGER_LINEARS):
        source, bits, clip = fake.args
        inner = 0
        if (len(linears) == len(fake.users) and source.op == "call_function" and source.target is HADAMARD_OP
                and len(source.users) == 1):
            source, inner = source.args  # fuse the online Hadamard into the quantizer
        rotation = fake.args[0]
        if _feed_codes(graph, fake, linears, QUANTIZE_PER_TOKEN, (source, bits, clip, inner), "integer op"):
            if inner:
                graph.erase_node(rotation)
                fused += 1
        for linear in linears:
            _decide_gemm(report, linear, source, ctx.config)
    report.counters["fused_hadamards"] += fused
    if fused:
        report.notes.append(f"integer kernels: {fused} online Hadamards fused into activation quantization")

    for fake in [n for n in graph.nodes if n.op == "call_function" and n.target is quantize_kv]:
        like = fake.meta.get(KV_LIKE)
        if not isinstance(like, torch.Tensor):
            continue
        source, bits, clip = fake.args
        with graph.inserting_before(fake):
            integer = _integer_kv(graph, source, bits, clip, like)
        fake.replace_all_uses_with(integer)
        graph.erase_node(fake)
        fake.meta[RECORD].storage = "integer op"
    drop_unused_constants(ctx.gm)
