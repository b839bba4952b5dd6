"""Decode speed of quarot W4A4KV4 against llama.cpp and float32 eager, in one process, round by round.

    python benchmarks/decode_interleaved.py [--model smollm2-135m] [--prompt 512] [--decode 32]
                                            [--rounds 10] [--int8-head]

``speed.py`` measures each row in its own process, minutes apart, and this VM's speed drifts by
tens of percent within minutes: two rows with the same decode code have differed by 26 %. Here
each model greedily decodes ``--decode`` tokens after a ``--prompt``-token prompt in turn (the
order reversed every other round), with the same loops as ``speed.py``'s rows (a static cache for
the torch models); a drift slows every column of a round alike, so the ratios of the medians hold.
The llama.cpp column (the issue's moonshot: its tokens/s) needs llama-cpp-python (``make
llama-cpp``); without it the column is left out with a message. ``--int8-head`` adds a column
for W4A4KV4 with ``quantize_lm_head="int8"`` (float activations into the 8-bit head: the default
before the nineteenth session, whose ``"auto"`` rounds them to int8 at W4A4KV4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_summary  # noqa: E402
from speed import llama_cpp, llama_cpp_timers, torch_timers  # noqa: E402

import quarot_fx  # noqa: E402,F401  (registers the backend)
from quarot_fx.tools.models import load_model  # noqa: E402


def interleave(decoders: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: each decoder (a callable returning the seconds of its timed
    decode) called once to warm up (compiles), then once per round in turn, in reverse order every
    other round so that no column always runs right after the same one."""
    for decode in decoders.values():
        decode()
    seconds = {name: [] for name in decoders}
    names = list(decoders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            seconds[name].append(decoders[name]())
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local path")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--int8-head", action="store_true", help="also W4A4KV4 with quantize_lm_head='int8'")
    parser.add_argument("--w8a8-head", action="store_true", help=argparse.SUPPRESS)  # now the default column
    args = parser.parse_args(argv)
    timing = SimpleNamespace(decode=args.decode, cache="static")
    generator = torch.Generator().manual_seed(0)
    eager = load_model(args.model)[0]
    prompt = torch.randint(0, eager.config.vocab_size, (1, args.prompt), generator=generator)
    quarot = torch.compile(load_model(args.model)[0], backend="quarot", options={"preset": "w4a4kv4"})
    decoders = {"float32 eager": torch_timers(eager, prompt, prompt, timing)[1],
                "quarot w4a4kv4": torch_timers(quarot, prompt, prompt, timing)[1]}
    if args.w8a8_head:
        print("--w8a8-head: quantize_lm_head='w8a8' is the default at W4A4KV4 now: the 'quarot w4a4kv4' column")
    if args.int8_head:
        int8 = torch.compile(load_model(args.model)[0], backend="quarot",
                             options={"preset": "w4a4kv4", "quantize_lm_head": "int8"})
        decoders["quarot w4a4kv4 int8-head"] = torch_timers(int8, prompt, prompt, timing)[1]
    try:
        decoders["llama.cpp Q4_1 gguf"] = llama_cpp_timers(llama_cpp(args.model), prompt, prompt, timing)[1]
    except ImportError as missing:
        print(f"llama.cpp column left out: {missing} (make llama-cpp builds llama-cpp-python)")
    seconds = interleave(decoders, args.rounds)
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    print(f"{cpu_summary()}, {torch.get_num_threads()} threads; {args.model}, decode {args.decode} tokens after "
          f"{args.prompt}, {args.rounds} interleaved rounds")
    peer = medians.get("llama.cpp Q4_1 gguf")
    print(f"{'model':<26} {'tok/s':>7} {'best':>7} {'× fp32':>7} {'× llama.cpp':>12}")
    for name, times in seconds.items():
        versus = f"{peer / medians[name]:12.2f}" if peer else f"{'':>12}"
        print(f"{name:<26} {args.decode / medians[name]:7.1f} {args.decode / min(times):7.1f} "
              f"{medians['float32 eager'] / medians[name]:7.2f} {versus}")


if __name__ == "__main__":
    main()
