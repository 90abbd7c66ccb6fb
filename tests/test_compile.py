"""The static-cache decode path: same tokens as ChatTTS's loop, one compilation, cached artifacts."""

import json
import os
import subprocess
import sys

import pytest
import torch

from quantkit.apply import apply_recipe
from quantkit.compile import CompiledGenerate, save_compile_cache
from quantkit.models import load_chat
from quantkit.recipes import get_recipe
from quantkit.synth import synthesize

TEXTS = ["Hi.", "The birch canoe slid on the smooth planks.",
         "今天下午我们在会议室讨论新的计划，请把这份文件交给前台的工作人员。"]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """ChatTTS's own generate loop, fp32 eager: natural lengths (EOS allowed) and fixed ones."""
    chat = load_chat("synthetic-tiny")
    return {(t, seed, steps): synthesize(chat, t, seed=seed, steps=steps, max_new_tokens=80)
            for t in TEXTS for seed in (1, 2) for steps in (None, 40)}


@pytest.fixture(scope="module")
def compiled(tiny_dir, tmp_path_factory):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    torch._dynamo.reset()
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("fp32-compiled"))
    assert isinstance(chat.gpt.generate, CompiledGenerate)
    synthesize(chat, TEXTS[0], seed=1, steps=8)  # compiles
    return chat


def test_static_cache_path_matches_chattts_loop_eager(tiny_dir, reference):
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("fp32-compiled"), compile_step=False)
    for (text, seed, steps), ref in reference.items():
        out = synthesize(chat, text, seed=seed, steps=steps, max_new_tokens=80)
        assert torch.equal(out.tokens, ref.tokens), (text, seed, steps)
        assert out.wav.shape == ref.wav.shape
        assert abs(out.wav - ref.wav).max() < 1e-4


def test_compiled_step_matches_and_never_recompiles(compiled, reference):
    torch._dynamo.config.error_on_recompile = True  # any recompilation raises
    try:
        for (text, seed, steps), ref in reference.items():
            out = synthesize(compiled, text, seed=seed, steps=steps, max_new_tokens=80)
            assert torch.equal(out.tokens, ref.tokens), (text, seed, steps)
    finally:
        torch._dynamo.config.error_on_recompile = False
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, dict(torch._dynamo.utils.counters["stats"])


def test_fallback_beyond_cache_capacity_still_works(compiled):
    out = synthesize(compiled, TEXTS[1], seed=1, steps=1100)  # capacity 1024: ChatTTS's loop
    assert out.steps == 1100


CHILD = r"""
import json, sys, torch
from quantkit.apply import apply_recipe
from quantkit.compile import load_compile_cache
from quantkit.models import load_chat
from quantkit.recipes import get_recipe
from quantkit.synth import synthesize
loaded = load_compile_cache(sys.argv[1])
chat = load_chat("synthetic-tiny")
apply_recipe(chat, get_recipe("fp32-compiled"))
out = synthesize(chat, "Hi.", seed=1, steps=8)
c = torch._dynamo.utils.counters["inductor"]
print(json.dumps({"loaded": loaded, "hits": c["fxgraph_cache_hit"], "misses": c["fxgraph_cache_miss"],
                  "tokens": out.tokens.tolist()}))
"""


def test_compile_cache_round_trip_in_a_fresh_process(compiled, tmp_path):
    path = save_compile_cache(tmp_path / "cache")
    assert path is not None and path.stat().st_size > 0
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "cache")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] and result["hits"] >= 1 and result["misses"] == 0, result
    assert result["tokens"] == synthesize(compiled, "Hi.", seed=1, steps=8).tokens.tolist()
