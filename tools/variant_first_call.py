"""A fresh process's first Chat.infer calls on an exported variant -> one JSON line: load time,
first call, warm calls, graphs traced. Run it with an empty Inductor cache to see what a new
machine's process pays:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python tools/variant_first_call.py VARIANT --batch 8
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()

import torch  # noqa: E402

import quantkit  # noqa: E402
from quantkit import shapes  # noqa: E402
from quantkit.synth import fixed_speaker  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variant")
    p.add_argument("--batch", type=int, default=1, help="texts per call")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    chat = quantkit.load_variant(args.variant)
    loaded = time.perf_counter() - T0
    texts = [f"The quick brown fox jumps over the lazy dog, number {i}." for i in range(args.batch)]
    seconds, speaker = [], fixed_speaker(chat, 0)  # drawn once, as a user does: not part of a call
    for _ in range(args.calls):
        t = time.perf_counter()
        shapes.infer_fixed(chat, texts, args.steps, speaker=speaker)
        seconds.append(time.perf_counter() - t)
    print(json.dumps({"variant": args.variant, "batch": args.batch, "start_to_loaded_s": loaded,
                      "first_s": seconds[0], "warm_s": seconds[1:], "start_to_first_audio_s": loaded + seconds[0],
                      "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}))


if __name__ == "__main__":
    main()
