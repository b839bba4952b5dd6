"""Cost of binding a compiled graph to its parameters (the per-call identity/version check).

A 30-layer Llama shaped like SmolLM2's parameter list (273 tensors) but tiny (hidden 64), W4A4KV4,
fx lowering: one decode-sized call (1 token) through what Dynamo runs (``BoundGraph``) against
the same compiled graph called directly. Median of many calls, one run; prints the CPU.

    python benchmarks/binding.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_summary, median_seconds  # noqa: E402

from quarot_fx.backend import BoundGraph  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(config).eval().requires_grad_(False)
    captured = {}

    def backend(gm, example_inputs):
        from quarot_fx.config import QuaRotConfig

        bound = BoundGraph(gm, example_inputs, QuaRotConfig.from_options({"preset": "w4a4kv4", "lowering": "fx"}))
        captured.update(bound=bound, inputs=list(example_inputs))
        return bound

    ids = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        torch.compile(model, backend=backend)(ids, use_cache=False)
        bound, inputs = captured["bound"], captured["inputs"]
        runtime = [inputs[i] for i in bound.current.runtime]
        checked = median_seconds(lambda: bound(*inputs), repeats=200, warmup=20)
        direct = median_seconds(lambda: bound.current.compiled(*runtime), repeats=200, warmup=20)
        check = median_seconds(lambda: [bound.current.matches(inputs) for _ in range(100)], repeats=50) / 100
    print(cpu_summary())
    print(f"{len(bound.current.bound)} bound parameters: the check alone takes {check * 1e6:.1f} µs per call; "
          f"a call through the binding {checked * 1e3:.2f} ms vs {direct * 1e3:.2f} ms for the compiled graph "
          f"alone ({(checked / direct - 1) * 100:+.1f}%; whole-call medians move by a few % between runs here, "
          f"the check itself is {check / direct * 100:.2f}% of the call)")


if __name__ == "__main__":
    main()
