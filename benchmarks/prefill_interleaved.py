"""Prefill speed against float32 eager with every model in one process, measured round by round.

    python benchmarks/prefill_interleaved.py [--model smollm2-135m] [--prefill 2048] [--rounds 8]

``speed.py`` measures each row in its own process, minutes apart; on a shared machine whose speed
drifts by tens of percent within minutes, its prefill ratios move with the drift. Here float32
eager, quarot W4A4KV4 and W4A4KV4 with ``prefill_attention="int8"`` are built once, warmed up, then
timed in turn, one 1×``prefill`` forward each per round (logits of the last position, as
generation's first step): a drift slows every column of a round alike, so the medians' ratios
hold. It costs one process's memory for the three models.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_summary  # noqa: E402

import quarot_fx  # noqa: E402,F401  (registers the backend)
from quarot_fx.tools.models import load_model  # noqa: E402

COLUMNS = {
    "float32 eager": None,
    "quarot w4a4kv4": {"preset": "w4a4kv4"},
    "quarot w4a4kv4 int8-attention": {"preset": "w4a4kv4", "prefill_attention": "int8"},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local path")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    base = load_model(args.model)[0]
    ids = torch.randint(0, base.config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    models = {name: base if options is None else torch.compile(copy.deepcopy(base), backend="quarot", options=options)
              for name, options in COLUMNS.items()}
    seconds = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # compile and warm up
            for _ in range(2):
                model(ids, use_cache=True, logits_to_keep=1)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(ids, use_cache=True, logits_to_keep=1)
                seconds[name].append(time.perf_counter() - start)
    eager = statistics.median(seconds["float32 eager"])
    print(f"{cpu_summary()}, {torch.get_num_threads()} threads; {args.model}, prefill 1×{args.prefill}, "
          f"{args.rounds} interleaved rounds")
    print(f"{'model':<32} {'median s':>9} {'min s':>7} {'× fp32':>7}")
    for name, times in seconds.items():
        print(f"{name:<32} {statistics.median(times):9.3f} {min(times):7.3f} {eager / statistics.median(times):7.2f}")


if __name__ == "__main__":
    main()
