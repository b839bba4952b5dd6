"""``quarot-fx`` command line: ``demo`` (compile a model and show what the backend did), ``hadamard``."""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    import transformers as tf

    import quarot_fx

    options = {"preset": args.preset, "rotation": args.rotation, "lowering": args.lowering}
    config = quarot_fx.QuaRotConfig.from_options(options)  # fail fast on bad options
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    ids = torch.randint(0, 256, (1, 16))
    print(f"tiny random Llama (hidden 96, 2 layers); options {options}")
    print("quantization is not implemented yet: the demo rotates (R1-R4) and checks the function is unchanged")
    compiled = quarot_fx.compile(model, config)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out, ref = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
    for report in reports:
        print(report)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"relative error of compiled vs eager logits: {err:.2e}")
    return 0


def _hadamard(args: argparse.Namespace) -> int:
    from quarot_fx.hadamard import HadamardOrderError, hadamard_plan

    status = 0
    for n in args.sizes:
        try:
            plan = hadamard_plan(n)
            print(f"{n}: {plan.describe()}  ({plan.cost_per_element} multiply-adds per element, dense: {n})")
        except HadamardOrderError as err:
            print(f"{n}: {err}")
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quarot-fx", description="Rotate-then-quantize compiler for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a model with backend='quarot' and report what it did")
    demo.add_argument("--preset", default="fp")
    demo.add_argument("--rotation", default="hadamard")
    demo.add_argument("--lowering", default="inductor")
    demo.set_defaults(run=_demo)
    had = sub.add_parser("hadamard", help="show how quarot-fx builds Hadamard matrices of given orders")
    had.add_argument("sizes", type=int, nargs="+")
    had.set_defaults(run=_hadamard)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
