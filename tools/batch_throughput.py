"""Warm Chat.infer calls at a few batch sizes in one process -> medians and batch throughput.

For comparing two commits side by side, alternate processes, each importing its own checkout:
    for i in 1 2 3; do
      PYTHONPATH=OLD python tools/batch_throughput.py; PYTHONPATH=NEW python tools/batch_throughput.py
    done
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import quantkit
from quantkit import shapes
from quantkit.synth import fixed_speaker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="int8-dynamic-compiled")
    p.add_argument("--model", default="synthetic")
    p.add_argument("--batches", default="1,8", help="batch sizes, the first the baseline")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    chat = quantkit.load_chat(args.model)
    quantkit.apply_recipe(chat, args.recipe)
    texts = [f"The quick brown fox jumps over the lazy dog, number {i}." for i in range(max(sizes))]

    speaker = fixed_speaker(chat, 0)  # drawn once, as a user does: not part of a call

    def call(b: int) -> None:
        shapes.infer_fixed(chat, texts[:b], args.steps, speaker=speaker)

    for b in sizes:  # warm: what each batch bucket compiles, it compiles here
        call(b)
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    with torch.no_grad():
        for _ in range(args.rounds):
            for b in sizes:
                t0 = time.perf_counter()
                call(b)
                seconds[b].append(time.perf_counter() - t0)
    base = statistics.median(seconds[sizes[0]]) / sizes[0]
    for b in sizes:
        med = statistics.median(seconds[b])
        print(f"{quantkit.__file__}: batch {b}: {med:.3f} s, throughput {b * base / med:.2f}x batch {sizes[0]}")


if __name__ == "__main__":
    main()
