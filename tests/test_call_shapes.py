"""Every call shape users make through ChatTTS's own ``Chat.infer`` runs on the static-cache path
and picks exactly the tokens of ChatTTS's own loop: batches of mixed prompt lengths whose rows
stop at different steps, text refinement, streaming, lengths beyond the recipe's cache."""

import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEXTS, recording, run_cli

from quantkit import chattts, int8_gemv
from quantkit.apply import apply_recipe
from quantkit.compile import CompiledGenerate, compiled_decoding
from quantkit.compile_artifacts import Precompiled
from quantkit.errors import QuantkitError
from quantkit.linears import RowsLinear
from quantkit.models import load_chat
from quantkit.recipes import get_recipe, recipe_names
from quantkit.shapes import ShapeSettings, _row_steps_per_s, measure_batches
from quantkit.synth import fixed_speaker, teacher_forced


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """ChatTTS as shipped, and the same model on the static-cache path (eager step)."""
    ref = load_chat("synthetic-tiny")
    ours = load_chat("synthetic-tiny")
    apply_recipe(ours, get_recipe("fp32-compiled"), compile_step=False)
    assert isinstance(ours.gpt.generate, CompiledGenerate)
    return ref, ours


def infer(chat, texts, *, refine=False, stream=False, steps=None, max_new=80, seed=7, pass_first=2):
    code = chat.InferCodeParams(spk_emb=fixed_speaker(chat, 3), manual_seed=seed, show_tqdm=False,
                                max_new_token=steps or max_new, min_new_token=steps or 0,
                                pass_first_n_batches=pass_first)
    text = chat.RefineTextParams(manual_seed=seed, show_tqdm=False, max_new_token=48)
    out = chat.infer(texts, skip_refine_text=not refine, params_refine_text=text, params_infer_code=code,
                     stream=stream, do_text_normalization=False, split_text=False)
    return list(out) if stream else out


def same_tokens(a: list, b: list) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(torch.equal(i, j) for i, j in zip(x, y))
                                    for x, y in zip(a, b))


def compare(pair, texts, **kw) -> tuple[list, list]:
    ref, ours = pair
    with recording(ref) as seen_ref, recording(ours) as seen_ours:
        infer(ref, texts, **kw)
        infer(ours, texts, **kw)
    return seen_ref, seen_ours


def test_a_batch_of_mixed_lengths_matches_chattts_loop(pair):
    ref, ours = compare(pair, TEXTS, seed=3, max_new=100)
    (rows,) = ref
    assert same_tokens(ref, ours)
    lengths = [r.shape[0] for r in rows]
    assert len(set(lengths)) == 3 and min(lengths) < 100, lengths  # rows stop at their own EOS
    assert ours[0][0].shape[1] == 4


def test_a_batch_of_sixteen_matches_chattts_loop(pair):
    """The largest batch the evaluator times: sixteen prompts of nine lengths, rows stopping apart."""
    words = TEXTS[1].split()
    texts = [" ".join(words[: 1 + i % len(words)]) for i in range(15)] + TEXTS[2:]
    ref, ours = compare(pair, texts, seed=5, max_new=60)
    assert len(ours[0]) == 16 and same_tokens(ref, ours)
    assert len({r.shape[0] for r in ref[0]}) > 2  # rows stop at their own EOS


def test_a_batch_with_a_fixed_length_and_another_seed(pair):
    ref, ours = compare(pair, TEXTS[:2] + TEXTS[:1], steps=30, seed=11)
    assert same_tokens(ref, ours) and [r.shape[0] for r in ref[0]] == [30, 30, 30]


def test_a_batch_decode_steps_are_timed_apart(pair):
    """The evaluator's steps/s of a batch: the decode steps alone (one fewer than the tokens: the
    prompt pass gives the first), which take less than the whole call; none for ChatTTS's loop."""
    ref, ours = pair
    t0 = time.perf_counter()
    infer(ours, TEXTS[:3], steps=30)
    wall = time.perf_counter() - t0
    steps, seconds = compiled_decoding(ours).last_steps
    rate = _row_steps_per_s(ours, 3)
    assert steps == 29 and rate == pytest.approx(3 * 29 / seconds) and rate > 3 * 29 / wall
    infer(ref, TEXTS[:3], steps=30)
    assert _row_steps_per_s(ref, 3) is None


def test_batches_are_timed_as_medians_of_alternating_calls(pair):
    """The evaluator's batches: each size's seconds and decode-step rate are medians of its calls."""
    settings = ShapeSettings(batch_sizes=(1, 3), batch_steps=12, batch_runs=3)
    one, three = measure_batches(pair[1], TEXTS, settings, 0, fixed_speaker(pair[1], 0))
    assert [one["batch"], three["batch"]] == [1, 3]
    for b in (one, three):
        assert len(b["runs_s"]) == 3 and b["s"] == statistics.median(b["runs_s"])
        assert b["row_steps_per_s"] > b["batch"] * 11 / b["s"]  # the steps alone: faster than the call


def test_split_text_batches_behind_a_sampled_speaker_match_chattts_loop(pair, caplog):
    """ChatTTS's default ``split_text``: a list of texts runs its first text alone, takes that audio's
    codes as the speaker prompt (``spk_smp``), then runs the texts in batches of ``max_split_batch``
    behind that prompt. Every call stays on the compiled path and picks ChatTTS's tokens."""
    def split_call(chat):  # -> (tokens of each generate call, the speaker sample ChatTTS drew)
        params = chat.InferCodeParams(spk_emb=fixed_speaker(chat, 3), manual_seed=5, max_new_token=60,
                                      show_tqdm=False)
        with recording(chat) as seen:
            chat.infer(TEXTS + TEXTS[1:], skip_refine_text=True, params_infer_code=params,
                       do_text_normalization=False)
        return seen, params.spk_smp

    with caplog.at_level(logging.WARNING, logger="quantkit.compile"):
        (ref, ref_sample), (ours, our_sample) = (split_call(chat) for chat in pair)
    assert [len(call) for call in ours] == [1, 4, 1] and same_tokens(ref, ours)
    assert our_sample is not None and our_sample == ref_sample
    assert compiled_decoding(pair[1]).last_steps is not None  # the last batch ran the compiled steps
    assert not [r for r in caplog.records if r.name == "quantkit.compile"]  # no call fell back


def test_a_smaller_batch_after_a_larger_reuses_its_cache(pair):
    """Calls alternating between batch sizes do not allocate a cache each: a smaller batch runs on
    the first rows of the larger one's (stale slots beyond its own are never read), and picks
    ChatTTS's tokens."""
    cache = compiled_decoding(pair[1]).model.layers[0]
    compare(pair, TEXTS, steps=20)
    big = cache.k_cache
    assert big.shape[0] == 4
    ref, ours = compare(pair, TEXTS[1:2], steps=20, seed=2)
    assert cache.k_cache.shape[0] == 1 and cache.k_cache.data_ptr() == big.data_ptr()
    assert same_tokens(ref, ours)


def test_text_refinement_matches_chattts_loop(pair):
    ref, ours = compare(pair, TEXTS[:2], refine=True)
    assert len(ref) == 2  # the refined text tokens, then the audio codes
    assert ref[0][0].dim() == 1 and ref[0][0].numel() > 0
    assert same_tokens(ref, ours)


def test_bf16_heads_take_batches_and_refinement(tiny_dir):
    """bf16-compiled's heads are bf16 and get the GPT's hidden states in their dtype, as in ChatTTS's
    loop: a refined batch runs and picks what ChatTTS's loop does with the same bf16 modules (but
    for near-ties: the path's attention sums in fp32)."""
    import dataclasses

    from quantkit.recipes import CompileSettings

    recipe = get_recipe("bf16-compiled")
    ref, ours = load_chat("synthetic-tiny"), load_chat("synthetic-tiny")
    apply_recipe(ref, dataclasses.replace(recipe, compile=CompileSettings()))
    apply_recipe(ours, recipe, compile_step=False)
    seen_ref, seen_ours = compare((ref, ours), TEXTS[:2], refine=True, steps=30)
    assert len(seen_ours) == 2 and [r.shape[0] for r in seen_ours[1]] == [30, 30]
    codes_ref, codes_ours = torch.cat(seen_ref[1]), torch.cat(seen_ours[1])
    assert same_tokens(seen_ref[:1], seen_ours[:1])  # the refined text
    assert (codes_ref == codes_ours).float().mean().item() >= 0.95  # all equal on the CPU it was written on


@pytest.mark.parametrize("name", [n for n in recipe_names() if get_recipe(n).compile.enabled])
def test_every_compiled_recipe_takes_a_refined_batch(name, tiny_dir):
    """Every shipped compiled recipe's static-cache path (its step eager) takes the calls that reach
    the heads with several rows and the text head: a refined batch. (The others run ChatTTS's loop.)"""
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe(name), compile_step=False)
    with recording(chat) as seen:
        infer(chat, TEXTS[:2], refine=True, steps=12)
    assert len(seen) == 2 and [r.shape for r in seen[1]] == [(12, 4), (12, 4)]


@pytest.mark.skipif(not int8_gemv.cpu_supported(), reason="this CPU has no AVX512-VNNI")
def test_int8_batches_run_on_the_kernels_and_pick_the_same_tokens(tiny_dir):
    """An int8 recipe on a VNNI CPU attends, sorts and runs its code heads with quantkit's
    kernels; a batch of mixed prompt lengths then decodes the tokens that Inductor's attend_one,
    torch.sort and MKL's product (the float recipes') decode."""
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("int8-dynamic-compiled"), compile_step=False)
    model = compiled_decoding(chat).model
    assert model.kernels and all(layer.attention_kernel for layer in model.layers)
    assert isinstance(model.heads_code.fused, RowsLinear)
    texts = TEXTS * 4 + TEXTS[1:2]  # 13 rows: the kernel's 8-row tile and a remainder
    with recording(chat) as with_kernel:
        infer(chat, texts, max_new=40)
    model.kernels = False
    model.heads_code.fused = None
    for layer in model.layers:
        layer.attention_kernel = False
    with recording(chat) as without:
        infer(chat, texts, max_new=40)
    assert len(with_kernel[0]) == 13 and same_tokens(with_kernel, without)


def test_streaming_hands_over_as_chattts_does(pair):
    ref, ours = compare(pair, [TEXTS[1]], stream=True, steps=96, pass_first=0)
    assert len(ref) == 5 and same_tokens(ref, ours)  # every 24 steps, and the end
    assert [h[0].shape[0] for h in ours] == [24, 48, 72, 96, 96]
    _, whole = compare(pair, [TEXTS[1]], steps=96)
    assert torch.equal(ours[-1][0], whole[0][0])  # the chunks add up to the non-streamed tokens


def test_streams_read_in_turn_keep_to_their_own_cache(pair, caplog):
    """The static path has one KV cache: a call made while a stream of it is open runs ChatTTS's
    loop, with a warning naming why, rather than decode into the open stream's cache."""
    _, ours = pair

    def stream(text, seed):
        code = ours.InferCodeParams(spk_emb=fixed_speaker(ours, 3), manual_seed=seed, show_tqdm=False,
                                    max_new_token=72, min_new_token=72, pass_first_n_batches=0)
        return ours.infer([text], skip_refine_text=True, params_infer_code=code, stream=True,
                          do_text_normalization=False, split_text=False)

    alone = [np.concatenate(list(stream(TEXTS[0], 1)), 1), np.concatenate(list(stream(TEXTS[1], 2)), 1)]
    a, b = stream(TEXTS[0], 1), stream(TEXTS[1], 2)
    with caplog.at_level(logging.WARNING, logger="quantkit.compile"):
        turns = list(zip(a, b))
    assert len(turns) > 2
    for got, want in zip([np.concatenate(side, 1) for side in zip(*turns)], alone):
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert any("another decodes into this Chat's KV cache" in r.getMessage() for r in caplog.records)
    first = stream(TEXTS[0], 1)
    next(first)
    with pytest.raises(QuantkitError, match="teacher forcing while a call decodes"):  # the evaluator's fidelity
        teacher_forced(ours, TEXTS[1], torch.zeros(4, 4, dtype=torch.long))
    first.close()  # a stream closed early frees the cache too
    infer(ours, [TEXTS[0]], steps=8)
    assert ours.gpt.generate.last_steps is not None  # ran the static path


# A fresh process, whose first compile is a worker thread's: two Chats with a compiled recipe,
# called at the same moment from two threads (one row, then two: two cache shapes each), then a
# third Chat compiled in the main thread -> per call its texts, tokens and decode steps; warnings.
THREADS = """
import json, logging, sys, threading
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, sys.argv[1])
from conftest import recording
from test_call_shapes import infer
from quantkit.apply import apply_recipe
from quantkit.recipes import get_recipe
from quantkit.models import load_chat
logging.captureWarnings(True)
warned = []
handler = logging.Handler(logging.WARNING)
handler.emit = lambda record: warned.append(record.getMessage())
logging.getLogger().addHandler(handler)
start = threading.Barrier(2)
def run(batches, together=True):
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("fp32-compiled"))
    if together:
        start.wait()
    done = []
    for batch in batches:
        with recording(chat) as seen:
            infer(chat, batch, steps=40)
        done.append([batch, [[ids.tolist() for ids in out] for out in seen], chat.gpt.generate.last_steps[0]])
    return done
calls = json.loads(sys.argv[2])
with ThreadPoolExecutor(2) as pool:
    results = [f.result() for f in [pool.submit(run, batches) for batches in calls[:2]]]
print(json.dumps([results[0] + results[1] + run(calls[2], together=False), warned]))
"""


def test_one_chat_per_thread_runs_each_on_the_compiled_path_at_once(pair):
    """Two Chats compiled in two threads at once, then one in the main thread: each call gets
    ChatTTS's tokens on the compiled path, with no fallback (and no crash: torch 2.11 keeps the
    guard that tracing sets in the thread that first traces)."""
    ref, _ = pair
    calls = [[[TEXTS[1]], TEXTS[:2]], [[TEXTS[2]], TEXTS[1:]], [[TEXTS[0]], TEXTS[:1] + TEXTS[2:]]]
    proc = subprocess.run([sys.executable, "-c", THREADS, str(Path(__file__).parent), json.dumps(calls)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done, warned = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not warned, warned
    assert [batch for batch, _, _ in done] == [b for batches in calls for b in batches]
    for batch, seen, steps in done:
        assert steps == 39  # the static path's decode steps
        with recording(ref) as theirs:
            infer(ref, batch, steps=40)
        assert seen == [[ids.tolist() for ids in out] for out in theirs]


def test_a_long_stream_decodes_each_hand_over_in_a_bounded_window(pair):
    """ChatTTS decodes the whole prefix again at every hand-over; here the decoder gets the new
    tokens with CONTEXT tokens around them, and the stream carries the same audio."""
    ref, ours = pair
    frames = {id(ref): [], id(ours): []}  # the time axis of the decoder's input: tokens
    hooks = [chattts.components(c)["decoder"].register_forward_pre_hook(
        lambda m, args, seen=frames[id(c)]: seen.append(args[0].shape[-1])) for c in pair]
    try:
        theirs, chunks = (infer(c, [TEXTS[1]], stream=True, steps=240, pass_first=0) for c in pair)
    finally:
        for hook in hooks:
            hook.remove()
    assert [c.shape for c in chunks] == [c.shape for c in theirs]
    peak = max(np.abs(c).max() for c in theirs if c.size)
    for a, b in zip(chunks, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * peak)
    assert frames[id(ref)] == [24, 48, 72, 96, 120, 144, 168, 192, 216, 240, 240]  # tokens decoded
    assert frames[id(ours)] == [24, 48, 72, 96, 120, 144, 152, 152, 152, 152, 128]


def test_a_length_beyond_the_recipe_cache(pair):
    ref, ours = compare(pair, [TEXTS[0]], steps=1100)
    assert ref[0][0].shape[0] == 1100 and same_tokens(ref, ours)
    assert pair[1].gpt.generate.model.capacity == 2048  # grown, not fallen back


def test_apply_takes_steps_beyond_the_recipe_cache(tiny_dir):
    """`apply --steps` is bounded by ChatTTS's positions, not by the cache the recipe starts with."""
    proc = run_cli("apply", "fp32-compiled", "--model", "synthetic-tiny", "--steps", "1100", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 1100 and out["step_ms"] is not None  # timed apart: the compiled steps ran
    assert "WARNING" not in proc.stderr, proc.stderr  # no fallback


def test_uncovered_calls_fall_back_with_a_warning_naming_the_reason(pair, caplog):
    _, ours = pair
    gen = ours.gpt.generate

    def odd(ids, scores):
        return scores

    spk = fixed_speaker(ours, 3)
    params = ours.InferCodeParams(spk_emb=spk, manual_seed=1, max_new_token=8, show_tqdm=False)
    inputs = ours.tokenizer.encode(ours.speaker.decorate_code_prompts([TEXTS[1]], params.prompt, params.txt_smp,
                                                                      params.spk_emb), 4)
    emb = ours.embed(inputs[0], inputs[2])
    with caplog.at_level(logging.WARNING, logger="quantkit.compile"):
        for _ in range(2):
            out = next(gen(emb, inputs[0], torch.tensor([0.3] * 4), 625, logits_processors=(odd,),
                           max_new_token=8, show_tqdm=False, manual_seed=1))
            assert out.ids[0].shape[0] <= 8
    warnings = [r.getMessage() for r in caplog.records if r.name == "quantkit.compile"]
    assert warnings == ["compiled decoding does not cover a logits processor it does not know: "
                        "this call runs ChatTTS's own loop"]  # once per reason


@pytest.mark.slow
def test_compiled_batches_and_lengths_compile_a_bounded_number_of_graphs(tiny_dir, tmp_path, monkeypatch):
    """One graph per (batch bucket, cache capacity) for the step and the prompt pass: after a
    warm-up over the buckets, no call recompiles; and the compiled path still matches ChatTTS."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref = load_chat("synthetic-tiny")
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("fp32-compiled"))
    for texts in (TEXTS[:1], TEXTS[:2], TEXTS + TEXTS[:1]):  # buckets 1, 2 and 4
        infer(chat, texts, steps=8)
    torch._dynamo.config.error_on_recompile = True
    try:
        for texts, seed in ((TEXTS[1:2], 4), (TEXTS[1:], 5), (TEXTS, 6), (TEXTS[::-1][:1], 7)):
            with recording(ref) as seen_ref, recording(chat) as seen:
                infer(ref, texts, seed=seed)
                infer(chat, texts, seed=seed)
            assert same_tokens(seen_ref, seen), (texts, seed)
    finally:
        torch._dynamo.config.error_on_recompile = False
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] <= 2 * 3, dict(stats)  # step and prompt pass per batch bucket
    fns = compiled_decoding(chat).functions  # each bucket runs its own ahead-of-time step
    steps = fns.step_for(fns.default).by_shape
    assert sorted(steps) == [(1, 1024), (2, 1024), (4, 1024)]
    assert all(isinstance(fn, Precompiled) for fn in steps.values())
