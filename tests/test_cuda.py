"""Compiled decoding on CUDA (skipped without a GPU; CI has none): the static-cache path picks
ChatTTS's tokens on the GPU, the step runs as CUDA graphs without recompiling, the GPU
weight-only recipes predict on CUDA graphs what they do eagerly, and an eval's Whisper runs on
the GPU."""

from pathlib import Path

import pytest
import torch
from conftest import TEXTS

from quantkit.apply import apply_recipe
from quantkit.models import load_chat
from quantkit.recipes import get_recipe
from quantkit.synth import synthesize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [(t, seed, steps) for t in TEXTS for seed in (1, 2) for steps in (None, 40)]


def _tokens(chat) -> dict:
    return {c: synthesize(chat, c[0], seed=c[1], steps=c[2], max_new_tokens=80).tokens for c in CASES}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """ChatTTS's own loop on the GPU, fp32 eager."""
    return _tokens(load_chat("synthetic-tiny", "cuda"))


@pytest.mark.parametrize("full_keys", [False, True], ids=["filled-slots", "every-slot-masked"])
def test_static_cache_path_matches_chattts_loop_on_cuda(reference, full_keys):
    chat = load_chat("synthetic-tiny", "cuda")
    apply_recipe(chat, get_recipe("fp32-compiled"), compile_step=False)
    chat.gpt.generate.model.set_full_keys(full_keys)
    synthesize(chat, TEXTS[2], seed=3, steps=60)  # stale slots beyond the shorter texts
    out = _tokens(chat)
    assert all(torch.equal(out[c], reference[c]) for c in CASES)


def test_cuda_graphs_step_matches_and_never_recompiles(reference):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    chat = load_chat("synthetic-tiny", "cuda")
    apply_recipe(chat, get_recipe("fp32-compiled"))  # mode "auto": CUDA graphs on CUDA
    gen = chat.gpt.generate
    assert gen.functions.settings.mode == "reduce-overhead" and gen.graphs and gen.model.full_keys
    synthesize(chat, TEXTS[0], seed=1, steps=8)  # compiles, records
    torch._dynamo.config.error_on_recompile = True
    try:
        out = _tokens(chat)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert all(torch.equal(out[c], reference[c]) for c in CASES)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the step and the prompt pass


def test_batches_on_cuda_graphs_match_chattts_loop(tiny_dir):
    """A batch of mixed prompt lengths, rows stopping at their own EOS, on the graphed path."""
    from quantkit.synth import fixed_speaker

    def tokens(chat):
        p = chat.InferCodeParams(spk_emb=fixed_speaker(chat, 3), manual_seed=3, max_new_token=100, show_tqdm=False)
        return next(chat._infer_code(TEXTS, False, chat.device, True, p)).ids

    ref = tokens(load_chat("synthetic-tiny", "cuda"))
    chat = load_chat("synthetic-tiny", "cuda")
    apply_recipe(chat, get_recipe("fp32-compiled"))
    out = tokens(chat)
    assert len(out) == 3 and all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("recipe", ["int8-weight-only-bf16-compiled", "fp8-weight-only-compiled"])
def test_gpu_weight_only_recipes_compiled_predict_what_they_do_eagerly(recipe, tiny_dir):
    """The GPU weight-only recipes on CUDA graphs: teacher-forced predictions as the same recipe's
    torchao Linears in ChatTTS's loop (bf16: near-ties may flip)."""
    import dataclasses

    from quantkit.recipes import CompileSettings
    from quantkit.synth import teacher_forced

    compiled_recipe = get_recipe(recipe)
    eager, compiled = load_chat("synthetic-tiny", "cuda"), load_chat("synthetic-tiny", "cuda")
    apply_recipe(eager, dataclasses.replace(compiled_recipe, compile=CompileSettings()))
    apply_recipe(compiled, compiled_recipe)
    tokens = synthesize(eager, TEXTS[1], seed=4, steps=24).tokens
    ref, out = teacher_forced(eager, TEXTS[1], tokens, seed=4), teacher_forced(compiled, TEXTS[1], tokens, seed=4)
    assert (out.logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean().item() >= 0.95
    assert (out.logprobs - ref.logprobs).abs().max() < 0.05


def test_eval_whisper_runs_on_cuda_as_on_cpu():
    """A GPU eval transcribes on the GPU (its device), computing what the CPU computes."""
    import whisper

    from quantkit.asr import BUNDLES, converted, load_asr, transcribe
    from quantkit.audio import read_wav, resample
    from quantkit.evaluate import EvalConfig, load_checked_asr

    if converted("tiny.en") is None and BUNDLES["tiny.en"].files() is None:
        pytest.skip("no Whisper tiny.en here (tools/gpu-check.sh part 2 puts it in the cache)")
    gpu = load_checked_asr(EvalConfig(), "en", torch.device("cuda"))
    cpu = load_asr("tiny.en")
    assert next(gpu.parameters()).is_cuda
    audio, rate = read_wav(Path(__file__).parent / "data" / "zh_speech" / "z01.wav")
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(resample(audio, rate, 16000))))
    with torch.no_grad():
        ours, theirs = gpu.encoder(mel[None].cuda()).cpu(), cpu.encoder(mel[None])
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)  # cuDNN's convolutions may use TF32
    assert isinstance(transcribe(gpu, audio, rate, "en"), str)
