"""``quarot-fx`` command line: ``demo`` (compile a model and show what the backend did), ``hadamard``."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .config import LOWERINGS, PRESETS
from .numerics.rotations import rotation_kinds


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _model(text: str) -> str:
    """'tiny', 'smollm2-135m', or a local Hugging Face model directory (nothing is downloaded)."""
    if text.lower() in ("tiny", "smollm2-135m", "smollm2") or os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither 'tiny', 'smollm2-135m' nor a local model directory (models are never downloaded)")


def _demo(args: argparse.Namespace) -> int:
    if args.model != "tiny":
        from .tools.demo import run_demo

        run_demo(args.model, args.text, args.windows, args.preset, args.lowering, args.steps)
        return 0
    return _tiny_demo(args)


def _tiny_demo(args: argparse.Namespace) -> int:
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
    compiled = quarot_fx.compile(model, config)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out, ref = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
    for report in reports:
        print(report)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"relative error of compiled vs eager logits: {err:.2e}")
    return 0


def _hadamard(args: argparse.Namespace) -> int:
    from quarot_fx.numerics.hadamard import HadamardOrderError, hadamard_plan

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
    demo.add_argument("--model", default="smollm2-135m", type=_model,
                      help="'smollm2-135m', a local model directory, or 'tiny'")
    demo.add_argument("--text", default=None, type=_existing_file, help="evaluation text (WikiText-2 raw test file)")
    demo.add_argument("--windows", type=_positive, default=2, help="2048-token windows for perplexity")
    demo.add_argument("--steps", type=_positive, default=12, help="greedy tokens of the continuation")
    demo.add_argument("--preset", default="w4a4kv4", choices=tuple(PRESETS))
    demo.add_argument("--rotation", default="hadamard", choices=rotation_kinds(), help="tiny model only")
    demo.add_argument("--lowering", default="fx", choices=LOWERINGS,
                      help="'fx' (default: starts at once) or 'inductor' (adds ~2 min of compiles here)")
    demo.set_defaults(run=_demo)
    had = sub.add_parser("hadamard", help="show how quarot-fx builds Hadamard matrices of given orders")
    had.add_argument("sizes", type=_positive, nargs="+")
    had.set_defaults(run=_hadamard)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
