"""Warm Chat.infer calls at a few batch sizes in one process -> medians and batch throughput.

For comparing two commits side by side, alternate processes, each importing its own checkout:
    for i in 1 2 3; do
      PYTHONPATH=OLD python tools/batch_throughput.py; PYTHONPATH=NEW python tools/batch_throughput.py
    done
"""

from __future__ import annotations

import argparse

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

    settings = shapes.ShapeSettings(batch_sizes=tuple(sizes), batch_steps=args.steps, batch_runs=args.rounds)
    with torch.no_grad():  # the speaker drawn once, as a user does: not part of a call
        batches = shapes.measure_batches(chat, texts, settings, 0, fixed_speaker(chat, 0))
    base, steps = batches[0]["audio_s_per_s"], batches[0]["row_steps_per_s"]
    for b in batches:
        scaling = f", decode steps {b['row_steps_per_s'] / steps:.3g}x" if steps else ""
        print(f"{quantkit.__file__}: batch {b['batch']}: {b['s']:.3f} s, "
              f"throughput {b['audio_s_per_s'] / base:.3g}x batch {sizes[0]}{scaling}")


if __name__ == "__main__":
    main()
