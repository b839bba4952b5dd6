"""``quarot-fx`` command line.

``quantize MODEL --preset … [--weights gptq --calib FILE] -o DIR``, ``eval DIR|OUT|MODEL --text FILE``,
``export DIR --format compressed-tensors -o OUT``, ``explain MODEL``, ``generate DIR|MODEL --prompt …``, ``outliers MODEL --text FILE -o PNG``, ``demo`` (compile a model and show what the
backend did), ``hadamard``. MODEL: ``smollm2-135m``, a local Hugging Face directory or a GGUF
file (nothing is downloaded); DIR: what ``quantize`` saved (``quarot_fx.save``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .config import LOWERINGS, PRESETS
from .exporter import APPROXIMATIONS, FORMATS
from .numerics.rotations import rotation_kinds
from .numerics.weight_methods import weight_methods


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


def _model_or_dir(text: str) -> str:
    """MODEL (see _model), a GGUF file, or a DIR that ``quantize`` wrote."""
    if text.lower().endswith(".gguf") and os.path.isfile(text):
        return text
    if text.lower() == "tiny":
        raise argparse.ArgumentTypeError("'tiny' is for demo only; give 'smollm2-135m', a model directory or a GGUF file")
    return _model(text)


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as JSON when it parses (numbers, true/false, null), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _options(args: argparse.Namespace) -> dict:
    """The quarot options the flags ask for (checked now, so a bad one fails before any model loads)."""
    import quarot_fx

    options = {k: v for k, v in (("preset", args.preset), ("weights", getattr(args, "weights", None))) if v}
    options.update(dict(args.option or ()))
    if "calibration" in options:
        raise ValueError("--option calibration=…: give calibration text with --calib FILE (quantize)")
    if options:  # calibration-dependent checks wait for the data; the rest fail now
        quarot_fx.QuaRotConfig.from_options({**options, "calibration": [torch.zeros(1, dtype=torch.long)]})
    return options


def _print(result, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result))
    else:
        print("\n".join(f"{k}: {v}" for k, v in result.items()))


def _quantize(args: argparse.Namespace) -> int:
    from .tools import commands

    _print(commands.quantize(args.model, _options(args), args.calib, args.calib_windows, args.output, args.window),
           args.json)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .tools import commands

    _print(commands.evaluate(args.target, _options(args), args.text, args.windows, args.window), args.json)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .tools import commands

    _print(commands.export(args.target, args.output, args.format, args.approximate or [], args.overwrite,
                           online_transforms=args.online_transforms), args.json)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .tools import commands

    print(commands.generate(args.target, _options(args), args.prompt, args.steps))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .tools import commands

    print(commands.explain(args.model, _options(args) or {"preset": "w4a4kv4"}, args.tokens))
    return 0


def _outliers(args: argparse.Namespace) -> int:
    from .tools import commands

    _print(commands.outliers(args.model, args.text, args.tokens, args.smoothrot, args.output), args.json)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.model != "tiny":
        from .tools.demo import run_demo

        run_demo(args.model, args.text, args.windows, args.preset, args.lowering, args.steps, args.quick, args.best)
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
    demo.add_argument("--quick", action="store_true",
                      help="float and the preset without and with rotation only (no W8A8KV8, no saved best row)")
    demo.add_argument("--best", default="quarot-artifacts/w4a4kv4-best", metavar="DIR",
                      help="a saved quarot artifact shown as the best row when present (`make demo-best` makes it)")
    demo.set_defaults(run=_demo)

    def quarot_flags(p, weights=True):
        p.add_argument("--preset", choices=tuple(PRESETS), help="bit widths (see README, Options)")
        if weights:
            p.add_argument("--weights", choices=weight_methods(),
                           help="weight method (those that calibrate, e.g. gptq/obr, need --calib)")
        p.add_argument("--option", type=_option, action="append", metavar="KEY=VALUE",
                       help="any other quarot option, e.g. --option smoothrot=true (repeatable)")

    quantize = sub.add_parser("quantize", help="quantize MODEL once and save it to DIR (calibrating if asked)")
    quantize.add_argument("model", type=_model_or_dir, metavar="MODEL")
    quarot_flags(quantize)
    quantize.add_argument("--calib", type=_existing_file, help="calibration text (never the evaluation text)")
    quantize.add_argument("--calib-windows", type=_positive, default=32, help="calibration windows")
    quantize.add_argument("--window", type=_positive, default=2048, help="tokens per window (and compiled length)")
    quantize.add_argument("-o", "--output", required=True, metavar="DIR")
    quantize.add_argument("--json", action="store_true")
    quantize.set_defaults(run=_quantize)
    evaluate = sub.add_parser("eval", help="perplexity of a saved DIR, an exported OUT (run by compressed-tensors), "
                                           "or MODEL (float, or with --preset)")
    evaluate.add_argument("target", type=_model_or_dir, metavar="DIR|OUT|MODEL")
    quarot_flags(evaluate, weights=False)
    evaluate.add_argument("--text", required=True, type=_existing_file)
    evaluate.add_argument("--windows", type=_positive, default=None, help="windows to evaluate (default: all)")
    evaluate.add_argument("--window", type=_positive, default=2048, help="tokens per window")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=_eval)
    export = sub.add_parser("export", help="write a saved DIR as a checkpoint other runtimes load "
                                           "(compressed-tensors: vLLM, llm-compressor)")
    export.add_argument("target", metavar="DIR", help="what 'quarot-fx quantize' saved")
    export.add_argument("--format", default="compressed-tensors", choices=FORMATS)
    export.add_argument("--approximate", nargs="+", choices=APPROXIMATIONS, metavar="NAME",
                        help=f"accept what the format cannot express exactly: {', '.join(APPROXIMATIONS)}")
    export.add_argument("-o", "--output", required=True, metavar="OUT")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it is not empty (never the base model's directory or DIR)")
    export.add_argument("--no-online-transforms", dest="online_transforms", action="store_false",
                        help="write only what folds into the weights (R1, R2 per head, SmoothRot), for engines that "
                             "apply no online transform (vLLM's CPU build): R2's online part and R4 are left out, "
                             "their RTN weights quantized again (GPTQ/OBR weights: compile with r2=False r4=False)")
    export.add_argument("--json", action="store_true")
    export.set_defaults(run=_export)
    explain = sub.add_parser("explain", help="what the compiler finds and does in MODEL (no calibration)")
    explain.add_argument("model", type=_model_or_dir, metavar="MODEL")
    quarot_flags(explain, weights=False)
    explain.add_argument("--tokens", type=_positive, default=16, help="length of the example input")
    explain.set_defaults(run=_explain)
    gen = sub.add_parser("generate", help="greedy continuation of --prompt by a saved DIR or MODEL")
    gen.add_argument("target", type=_model_or_dir, metavar="DIR|MODEL")
    quarot_flags(gen, weights=False)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=_positive, default=20)
    gen.set_defaults(run=_generate)
    out = sub.add_parser("outliers", help="picture (PNG): per layer, max |x| at each quantized input, "
                                          "before and after rotation")
    out.add_argument("model", type=_model_or_dir, metavar="MODEL")
    out.add_argument("--text", required=True, type=_existing_file, help="text to run (calibration text)")
    out.add_argument("--tokens", type=_positive, default=512)
    out.add_argument("--smoothrot", action="store_true", help="add the curve after SmoothRot too")
    out.add_argument("-o", "--output", required=True, metavar="PNG")
    out.add_argument("--json", action="store_true")
    out.set_defaults(run=_outliers)
    had = sub.add_parser("hadamard", help="show how quarot-fx builds Hadamard matrices of given orders")
    had.add_argument("sizes", type=_positive, nargs="+")
    had.set_defaults(run=_hadamard)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # bad options, artifacts, files: the message, not a traceback
        print(f"quarot-fx {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
