"""The seed's problem, measured (issue 23): stock ChatTTS loaded with its own ``compile=True``
(which compiles the GPT on CUDA only), its first and warm call on each device, same text, seed and
steps. Prints one JSON line per device as it finishes (the CPU first: a GPU's first call can take
minutes).

    python tools/seed_compile.py --model synthetic --steps 96 --devices cpu,cuda
"""

from __future__ import annotations

import argparse
import json
import time

from quantkit.models import load_chat
from quantkit.synth import synthesize

TEXT = "The birch canoe slid on the smooth planks."


def calls(model: str, device: str, steps: int) -> dict:
    t0 = time.perf_counter()
    chat = load_chat(model, device, chattts_compile=True)
    load_s = time.perf_counter() - t0
    first = synthesize(chat, TEXT, seed=0, steps=steps)
    warm = synthesize(chat, TEXT, seed=0, steps=steps)
    return {"model": model, "device": device, "chattts_compile": True, "steps": steps, "load_s": load_s,
            "first_call_s": first.total_s, "warm_s": warm.total_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--devices", default="cpu,cuda")
    args = p.parse_args()
    for device in args.devices.split(","):
        print(json.dumps(calls(args.model, device, args.steps)), flush=True)


if __name__ == "__main__":
    main()
