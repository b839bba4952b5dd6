"""Paper estimate of the GPU path (no GPU here): FLOPs and bytes per token of each kernel.

    python benchmarks/gpu_estimate.py [--model smollm2-135m] [--context 512] [--json]

Counts come from the layer shapes only (``model.config``), per generated token at batch 1
(decode, the memory-bound case). Baseline: fp16 weights, activations and KV cache; quarot:
what the Triton kernels read and write — packed int4 weights with float32 per-channel scales,
int8 activation codes, a 4-bit KV cache with float32 scale and zero per head vector. The
fused Hadamard+quantize kernel computes Aᵀ·X·B on a padded [a, b] tile (``kronecker_split``),
so its FLOPs are 2·a'·b'·(a' + b') for padded sizes a', b', not n·log n. These are estimates
of work and traffic, not measured speed.
"""

from __future__ import annotations

import argparse
import json

from quarot_fx.numerics.hadamard import is_hadamard_order, next_hadamard_order
from quarot_fx.kernels.triton_quant import _tile, kronecker_split

FP16, INT4, SCALE = 2, 0.5, 4


def linears(config) -> list[tuple[str, int, int]]:
    d, ffn = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    return [("q_proj", d, heads * head_dim), ("k_proj", d, kv_heads * head_dim), ("v_proj", d, kv_heads * head_dim),
            ("o_proj", heads * head_dim, d), ("gate_proj", d, ffn), ("up_proj", d, ffn), ("down_proj", ffn, d)]


def fused_hadamard_flops(n: int, inner: int = 1) -> int | None:
    split = kronecker_split(n // inner, inner)
    if split is None:
        return None
    a, b = map(_tile, split)
    return 2 * a * b * (a + b)


def rows(config, context: int) -> list[dict]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = []
    for name, k, n in linears(config):
        out.append({"kernel": f"{name} GEMM ({k}→{n})", "flops": 2 * k * n,
                    "fp16_bytes": FP16 * (k * n + k + n),
                    "quarot_bytes": INT4 * k * n + SCALE * n + k + SCALE + FP16 * n})
    # Online Hadamards fused into the activation quantizer of o_proj (cross-head) and down_proj (R4).
    o_in = heads * head_dim
    cross = (heads, head_dim) if is_hadamard_order(heads) else (o_in, 1)
    ffn = config.intermediate_size
    ffn_padded = ffn if is_hadamard_order(ffn) else next_hadamard_order(ffn)
    for name, n, inner in (("Hadamard+quantize o_proj input", cross[0] * cross[1], cross[1]),
                           ("Hadamard+quantize down_proj input", ffn_padded, 1)):
        flops = fused_hadamard_flops(n, inner)
        out.append({"kernel": name + ("" if flops else " (unfused: no tile split)"),
                    "flops": flops or 2 * n * n, "fp16_bytes": 0, "quarot_bytes": FP16 * n + n + SCALE})
    # Per-head R3 Hadamard on query and key (head_dim butterfly), and KV quantization.
    qk = (heads + kv_heads) * head_dim
    out.append({"kernel": "Hadamard on q, k (per head)", "flops": qk * max(head_dim.bit_length() - 1, 1),
                "fp16_bytes": 0, "quarot_bytes": 2 * FP16 * qk})
    per_vector_fp16, per_vector_q = FP16 * head_dim, INT4 * head_dim + 2 * SCALE
    out.append({"kernel": f"KV cache read ({context} tokens)", "flops": 0,
                "fp16_bytes": 2 * kv_heads * context * per_vector_fp16,
                "quarot_bytes": 2 * kv_heads * context * per_vector_q})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from quarot_fx.tools.models import load_model

    config = load_model(args.model)[0].config
    table = rows(config, args.context)
    layers = config.num_hidden_layers
    if args.json:
        print(json.dumps({"model": args.model, "layers": layers, "rows": table}))
        return
    print(f"ESTIMATE (not measured): {args.model}, per token per layer, batch 1, context {args.context}")
    print(f"{'kernel':<46} {'FLOPs':>10} {'fp16 bytes':>11} {'quarot bytes':>12} {'ratio':>6}")
    for r in table:  # fp16 bytes 0: a kernel the float model does not run
        ratio = f"{r['quarot_bytes'] / r['fp16_bytes']:6.2f}" if r["fp16_bytes"] else "   new"
        print(f"{r['kernel']:<46} {r['flops']:>10,} {r['fp16_bytes']:>11,} {r['quarot_bytes']:>12,.0f} {ratio}")
    fp16 = sum(r["fp16_bytes"] for r in table) * layers
    quarot = sum(r["quarot_bytes"] for r in table) * layers
    gemm = sum(r["flops"] for r in table if "GEMM" in r["kernel"])
    extra = sum(r["flops"] for r in table if "GEMM" not in r["kernel"])
    print(f"\nwhole model ({layers} layers, embeddings and head excluded): {fp16 / 2**20:.1f} MiB → "
          f"{quarot / 2**20:.1f} MiB per token ({fp16 / quarot:.2f}× less traffic); "
          f"online transforms add {extra / gemm:.1%} to the GEMM FLOPs")


if __name__ == "__main__":
    main()
