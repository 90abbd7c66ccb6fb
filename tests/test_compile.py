"""The static-cache decode path: same tokens as ChatTTS's loop, one compilation, cached artifacts."""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, assert_one_line_error, run_cli, write_compile_cache

from quantkit.apply import apply_recipe
from quantkit.compile import CompiledGenerate, compiled_decoding
from quantkit.models import load_chat
from quantkit.recipes import get_recipe
from quantkit.synth import synthesize


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """ChatTTS's own generate loop, fp32 eager: natural lengths (EOS allowed) and fixed ones."""
    chat = load_chat("synthetic-tiny")
    return {(t, seed, steps): synthesize(chat, t, seed=seed, steps=steps, max_new_tokens=80)
            for t in TEXTS for seed in (1, 2) for steps in (None, 40)}


@pytest.fixture(scope="module")
def compiled(tiny_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield _compiled_chat()


def _compiled_chat():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # count this fixture's graphs, not earlier tests'
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("fp32-compiled"))
    assert isinstance(chat.gpt.generate, CompiledGenerate)
    synthesize(chat, TEXTS[0], seed=1, steps=8)  # compiles
    return chat


@pytest.mark.parametrize("full_keys", [False, True], ids=["filled-slots", "every-slot-masked"])
def test_static_cache_path_matches_chattts_loop_eager(tiny_dir, reference, full_keys):
    """Both ways a step attends: to the filled slots (CPU), or to every slot of the cache under a
    mask (one shape for every length, for CUDA graphs), after an utterance left stale slots."""
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("fp32-compiled"), compile_step=False)
    chat.gpt.generate.model.set_full_keys(full_keys)
    synthesize(chat, TEXTS[2], seed=3, steps=60)  # fills slots beyond the shorter texts' lengths
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
    assert frames == 2, dict(torch._dynamo.utils.counters["stats"])  # the step and the prompt pass


def test_decode_steps_are_timed_apart_from_the_prompt_pass(compiled, reference):
    from quantkit.evaluate import EvalConfig, measure

    for steps in (40, None):  # a fixed count, and a natural length ended by EOS
        out = synthesize(compiled, TEXTS[1], seed=1, steps=steps, max_new_tokens=80)
        advanced, seconds = compiled_decoding(compiled).last_steps
        # the prompt pass gives the first token; a call ended by EOS also stepped to find it
        assert advanced == out.steps - 1 if steps else advanced in (out.steps - 1, out.steps)
        assert out.step_s == pytest.approx(seconds / advanced) and 0 < seconds < out.gpt_s
    assert reference[(TEXTS[1], 1, 40)].step_s is None  # ChatTTS's own loop: not timed

    timing, _peak = measure(compiled, EvalConfig(model="synthetic-tiny", runs=2, max_new_tokens=24), TEXTS[1])
    runs = timing.bandwidth_runs
    assert timing.step_ms_median > 0 and all(run["step_gbs"] > 0 for run in runs)
    assert timing.step_bandwidth_fraction == pytest.approx(
        statistics.median(run["step_gbs"] / run["read_gbs"] for run in runs))


@pytest.mark.parametrize("history,logits_of", [
    (16, lambda rows, vocab: torch.randn(rows, vocab) * 3),
    (5, lambda rows, vocab: torch.randn(rows, vocab) * 3),
    (0, lambda rows, vocab: torch.randn(rows, vocab) * 3),
    (16, lambda rows, vocab: torch.randn(rows, vocab) * 0.05),  # flat: top-p keeps more than top-k
    (16, lambda rows, vocab: torch.randint(-6, 7, (rows, vocab)).float()),  # ties everywhere
])
def test_process_logits_is_chattts_pipeline(history, logits_of):
    """Probabilities equal to ChatTTS's own processors and warpers at its defaults, for 8 rows of
    4 codebooks, with repeated tokens in the penalty window and fewer than a window of them, where
    top-p leaves fewer or more tokens than top-k, and with equal logits; with torch.sort and with
    the CPU kernels' sort."""
    from ChatTTS.model.processors import gen_logits

    from quantkit import int8_gemv
    from quantkit.chattts import sampling_from
    from quantkit.sampling import process_logits

    torch.manual_seed(history)
    rows, vocab = 32, 626
    warpers, processors = gen_logits(num_code=vocab - 1, top_P=0.7, top_K=20, repetition_penalty=1.05)
    s = sampling_from((*processors, *warpers), vocab - 1)
    logits, temp = logits_of(rows, vocab), torch.rand(rows, 1) + 0.1
    sorts = [torch.sort] + ([int8_gemv.sort_rows] if int8_gemv.library() else [])
    past = torch.randint(0, 40, (rows, history))  # few distinct tokens: repeats
    window = torch.cat([torch.full((rows, s.past_window - history), -1), past], 1)
    for mask_eos in (False, True):
        ref = logits / temp
        for p in (*processors, *warpers):
            ref = p(past, ref)
        if mask_eos:
            ref[:, s.eos] = -float("inf")
        for sort in sorts:
            ours = process_logits(logits, window, temp, torch.tensor(mask_eos), s, sort)
            assert torch.equal(ours, torch.softmax(ref, 1))


def test_draw_is_torch_multinomial_given_its_noise():
    from quantkit.sampling import draw

    g = torch.Generator()
    for seed in range(200):
        probs = torch.softmax(torch.randn(4, 626, generator=g.manual_seed(10_000 + seed)) * 3, -1)
        probs[:, ::3] = 0  # masked tokens (top-p, top-k) are never drawn
        probs /= probs.sum(-1, keepdim=True)
        ref = torch.multinomial(probs, 1, generator=g.manual_seed(seed)).view(1, -1)
        noise = torch.empty_like(probs).exponential_(1, generator=g.manual_seed(seed))
        assert torch.equal(draw(probs, noise), ref), seed


@pytest.mark.parametrize("compile_step", [False, True])
def test_unseeded_sampling_draws_from_the_global_generator_as_chattts(tiny_dir, compiled, compile_step):
    """manual_seed=None: each step's noise comes from torch's global generator, as ChatTTS's
    torch.multinomial call takes it, so the same global seed gives the same tokens."""
    from quantkit.synth import infer_params

    ref_chat = load_chat("synthetic-tiny")
    chat = compiled if compile_step else load_chat("synthetic-tiny")
    if not compile_step:
        apply_recipe(chat, get_recipe("fp32-compiled"), compile_step=False)

    def tokens(c):
        params = infer_params(c, 5, None, 60, None)
        params.manual_seed = None
        torch.manual_seed(123)
        out = next(c._infer_code([c.normalizer(TEXTS[1], True, True, None)], False, c.device, True, params))
        return out.ids[0]

    ref = tokens(ref_chat)
    assert ref.shape[0] > 10
    assert torch.equal(tokens(chat), ref)


CHILD = r"""
import json, sys, torch
from quantkit.run import run_recipe
recipe, folder, wav = sys.argv[1:]
out = run_recipe(recipe, model="synthetic-tiny", text="Hi.", seed=1, steps=8, out_wav=wav, compile_cache=folder)
c = torch._dynamo.utils.counters
print(json.dumps({"state": out["compile_cache"], "graphs": c["stats"]["unique_graphs"],
                  "hits": c["inductor"]["fxgraph_cache_hit"], "misses": c["inductor"]["fxgraph_cache_miss"]}))
"""


def _child(recipe: str, folder, wav, inductor_dir) -> dict:
    # Each in a fresh process with its own empty Inductor cache: what one process compiled and
    # saved is all the other can find.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir)}
    proc = subprocess.run([sys.executable, "-c", CHILD, recipe, str(folder), str(wav)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA" not in proc.stderr, proc.stderr  # torch's no-CUDA-runtime notice, on a CPU compile
    assert "ahead-of-time" not in proc.stderr, proc.stderr  # frozen code is not even tried
    return json.loads(proc.stdout.strip().splitlines()[-1])


FROZEN = str(Path(__file__).parent / "data" / "recipes" / "fp32-frozen.toml")


@pytest.mark.parametrize("recipe", ["fp32-compiled", FROZEN])
def test_saved_compilation_round_trip_in_a_fresh_process(recipe, tiny_dir, tmp_path):
    """`apply --compile-cache`: one process compiles and saves, a fresh one loads and compiles
    nothing (ahead-of-time decode step, text step and prompt pass), or, where the recipe cannot be compiled ahead
    of time (freezing), finds every Inductor kernel in the saved cache."""
    saver = _child(recipe, tmp_path / "cache", tmp_path / "a.wav", tmp_path / "inductor-1")
    loader = _child(recipe, tmp_path / "cache", tmp_path / "b.wav", tmp_path / "inductor-2")
    assert saver["state"] == "saved" and loader["state"] == "loaded"
    info = json.loads((tmp_path / "cache" / "compiled.json").read_text())
    if recipe == "fp32-compiled":
        assert info["kind"] == "aot" and saver["graphs"] == 3 and loader["graphs"] == 0, (saver, loader)
        shipped = {p.name: p.stat().st_mtime for p in (tmp_path / "cache" / info["kernels"]).rglob("*.main.so")}
        loaded = {p.name: p.stat().st_mtime for p in (tmp_path / "inductor-2").rglob("*.main.so")}
        assert shipped and loaded == shipped  # the saved kernels, copied (a rebuilt one is newer)
    else:
        assert info["kind"] == "inductor-cache" and saver["misses"] >= 1, saver
        assert loader["hits"] >= 1 and loader["misses"] == 0, loader
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_damaged_compile_cache_is_one_clear_error(tiny_dir, tmp_path):
    from quantkit.run import COMPILED_INFO

    cache = tmp_path / "cache"
    info = write_compile_cache(cache, b"not a compiled function", b"not one either")
    proc = run_cli("apply", "fp32-compiled", "--model", "synthetic-tiny", "--steps", "4",
                   "--compile-cache", str(cache), "--trust-compiled")
    assert_one_line_error(proc, "could not be loaded", str(cache))
    assert (cache / COMPILED_INFO).read_text() == json.dumps(info)  # nothing overwritten


def test_torchao_recipes_leave_inductors_settings_alone(tiny_dir):
    """torchao's quantize_ sets Inductor options process-wide by default, which changed what
    later compiles of other recipes in the process cached; quantkit gives them to its own
    compiles of a model holding torchao's weights instead."""
    from quantkit.inductor import TORCHAO_OPTIONS

    with torch._inductor.config.patch({k: False for k in TORCHAO_OPTIONS}):
        before = torch._inductor.config.get_config_copy()
        chat = load_chat("synthetic-tiny")
        apply_recipe(chat, get_recipe("int8-weight-only-compiled"))
        after = torch._inductor.config.get_config_copy()
    changed = {k for k in before if before[k] != after[k]} - {"cpp.vec_isa_ok"}  # quantkit's own probe skip
    assert not changed
    assert compiled_decoding(chat).functions.torchao
    fp32 = load_chat("synthetic-tiny")
    apply_recipe(fp32, get_recipe("fp32-compiled"))
    assert not compiled_decoding(fp32).functions.torchao


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight-only"])
def test_plain_int8_twin_computes_exactly_what_torchao_does(method):
    from torch import nn

    from quantkit.linears import PlainInt8Linear, plain_int8_twin
    from quantkit.quantize import quantize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=False))
    quantize_module(model, method, torch.device("cpu"))
    twin = plain_int8_twin(model[0])
    assert isinstance(twin, PlainInt8Linear)
    with torch.no_grad():
        for shape in [(1, 1, 64), (1, 7, 64)]:
            x = torch.randn(shape) * 3
            if method == "int8-dynamic" or shape[1] > 1:
                assert torch.equal(twin(x), model[0](x))
            else:  # the one-token weight-only GEMV sums in another order
                torch.testing.assert_close(twin(x), model[0](x), rtol=1e-5, atol=1e-5)
    assert plain_int8_twin(nn.Linear(4, 4)).__class__ is nn.Linear  # nothing to unwrap


def test_plain_float8_twin_computes_what_torchao_does():
    from torch import nn

    from quantkit.linears import PlainFloat8Linear, decode_twin
    from quantkit.quantize import is_quantized_linear, module_weight_bytes, quantize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=False)).to(torch.bfloat16)
    bf16_bytes = module_weight_bytes(model)
    quantize_module(model, "fp8-weight-only", torch.device("cpu"))
    assert is_quantized_linear(model[0]) and model[0].weight.qdata.dtype == torch.float8_e4m3fn
    assert 0.5 <= module_weight_bytes(model) / bf16_bytes < 0.55  # float8 weights plus fp32 row scales
    twin = decode_twin(model[0], torch.device("cpu"))
    assert isinstance(twin, PlainFloat8Linear)
    with torch.no_grad():
        x = torch.randn(1, 7, 64, dtype=torch.bfloat16) * 3
        assert torch.equal(twin(x), model[0](x))
        one = x[:, :1]  # the one-token GEMV sums in another order than the product: equal to bf16 rounding
        torch.testing.assert_close(twin(one), model[0](one), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_quantization_is_torchaos(dtype):
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    from quantkit.linears import quantize_rows

    torch.manual_seed(0)
    x = (torch.randn(5, 96) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0])[:, None]).to(dtype)
    x[3] = 0  # all-zero row: the scale's eps floor
    x[4, :2] = torch.tensor([-7.0, 7.0])  # ties at +-max|x|
    scale, zero = choose_qparams_affine(x, MappingType.SYMMETRIC, (1, 96), torch.int8, -128, 127,
                                        scale_dtype=torch.float32, zero_point_dtype=torch.int8,
                                        keepdim=True, eps=torch.finfo(torch.float32).eps)
    xq, ours = quantize_rows(x)
    assert ours.dtype == torch.float32 and torch.equal(ours, scale)
    assert torch.equal(xq, quantize_affine(x, (1, 96), scale, zero, torch.int8, -128, 127))
    # the VNNI kernel's unsigned input, eager and as Inductor vectorizes it
    for fn in (quantize_rows, torch.compile(quantize_rows)):
        (xq, s), (xu, su) = fn(x), fn(x, unsigned=True)
        assert xu.dtype == torch.uint8 and torch.equal(su, s)
        assert torch.equal(xu.to(torch.int16) - 128, xq.to(torch.int16))


def fp32_cache(recipe):
    """The recipe with its KV cache in the model's dtype: the step computes exactly what the
    eager modules compute."""
    return dataclasses.replace(recipe, compile=dataclasses.replace(recipe.compile, kv_cache="model"))


def test_int8_static_cache_path_matches_torchao_in_chattts_loop(tiny_dir):
    """int8-dynamic through the static-cache step (plain int8 twins), eager and compiled, against
    the same quantized weights run through ChatTTS's loop on torchao's tensor subclass."""
    ref_chat = load_chat("synthetic-tiny")
    apply_recipe(ref_chat, get_recipe("int8-dynamic"))
    recipe = fp32_cache(get_recipe("int8-dynamic-compiled"))
    eager, compiled = load_chat("synthetic-tiny"), load_chat("synthetic-tiny")
    apply_recipe(eager, recipe, compile_step=False)
    apply_recipe(compiled, recipe)
    for text in TEXTS[:2]:
        ref = synthesize(ref_chat, text, seed=3, steps=30)
        assert torch.equal(synthesize(eager, text, seed=3, steps=30).tokens, ref.tokens)
        # Inductor fuses the pointwise work around the int8 matmuls; a last-bit difference may
        # flip a rare token on another CPU, so the compiled path is held to near-identity.
        out = synthesize(compiled, text, seed=3, steps=30)
        assert (out.tokens == ref.tokens).float().mean().item() >= 0.95


@pytest.mark.parametrize("eager_recipe,compiled_recipe,tol", [
    ("fp32", "fp32-compiled", 1e-3), ("int8-dynamic", "int8-dynamic-compiled", 1e-3),
    ("int8-weight-only", "int8-weight-only-compiled", 1e-3),
    # bf16 recipes against themselves uncompiled (ChatTTS's loop, torchao's Linears): bf16 rounds
    # in other places, and a near-tie between the tiny model's logits may flip
    (None, "int8-weight-only-bf16-compiled", 0.05), (None, "fp8-weight-only-compiled", 0.05)])
def test_teacher_forcing_goes_through_the_compiled_step(eager_recipe, compiled_recipe, tol, tiny_dir):
    """Fidelity of a compiled recipe is measured on its compiled step: same predictions as the
    recipe's eager modules over the same code sequence."""
    from quantkit.recipes import CompileSettings
    from quantkit.synth import teacher_forced

    eager, compiled = load_chat("synthetic-tiny"), load_chat("synthetic-tiny")
    recipe = fp32_cache(get_recipe(compiled_recipe))
    apply_recipe(eager, get_recipe(eager_recipe) if eager_recipe else dataclasses.replace(recipe, compile=CompileSettings()))
    apply_recipe(compiled, recipe)
    text = TEXTS[1]
    tokens = synthesize(eager, text, seed=4, steps=24).tokens
    calls = []
    fns = compiled_decoding(compiled).functions
    s = fns.default
    step = fns.step_for(s)
    fns.precompiled[s] = lambda *a: calls.append(1) or step(*a)
    ref, out = teacher_forced(eager, text, tokens, seed=4), teacher_forced(compiled, text, tokens, seed=4)
    assert len(calls) == tokens.shape[0] - 1  # one compiled step per forced token after the prompt
    assert out.logprobs.shape == ref.logprobs.shape
    agree = (out.logprobs.argmax(-1) == ref.logprobs.argmax(-1)).float().mean().item()
    assert agree == 1.0 if eager_recipe else agree >= 0.95
    assert (out.logprobs - ref.logprobs).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_twin_matches_linear(dtype):
    from torch import nn

    from quantkit.linears import GemvLinear, decode_twin

    torch.manual_seed(0)
    lin = nn.Linear(64, 96).to(dtype)
    twin = decode_twin(lin, torch.device("cpu"))
    assert isinstance(twin, GemvLinear) and twin.weight is lin.weight  # shared, not copied
    with torch.no_grad():
        one, many = torch.randn(1, 1, 64, dtype=dtype), torch.randn(1, 5, 64, dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(twin(one), lin(one), rtol=tol, atol=tol)
        assert torch.equal(twin(many), lin(many))  # prefill: F.linear itself
    assert decode_twin(lin, torch.device("cuda")) is lin  # cuBLAS's GEMV is left alone


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_one_query_attention_is_sdpa(dtype, tol):
    from quantkit.static_cache import attend_one

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 12, n, 64).to(dtype) for n in (1, 37, 37))
    ours = attend_one(q, k, v, torch.ones(1, 37, dtype=torch.bool))
    assert ours.dtype == dtype and ours.shape == (1, 12, 1, 64)
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=tol, atol=tol)
    # rows of a batch with their own left padding: a padded key is never attended
    q, k, v = (torch.randn(3, 12, n, 64).to(dtype) for n in (1, 37, 37))
    valid = torch.arange(37)[None] >= torch.tensor([0, 5, 20])[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    torch.testing.assert_close(attend_one(q, k, v, valid), sdpa, rtol=tol, atol=tol)


def test_streamed_bf16_weights_move_to_one_huge_page_mapping(tiny_dir, compiled):
    from quantkit.linears import GemvLinear

    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe("bf16-compiled"))
    twins = [m for m in chat.gpt.generate.model.modules() if isinstance(m, GemvLinear)]
    assert len(twins) == 7 * chat.gpt.gpt.config.num_hidden_layers + 4  # q k v o gate up down, heads
    ptrs = [t.weight.data_ptr() for t in twins]  # laid end to end: one mapping
    assert len(set(ptrs)) == len(twins) and max(ptrs) - min(ptrs) < sum(t.weight.nbytes + 64 for t in twins)
    down = chat.gpt.gpt.layers[0].mlp.down_proj
    assert any(t.weight is down.weight for t in twins)  # moved, not copied: eager reads it too
    # fp32 weights stay in the storage ChatTTS's loader gave them
    fp32 = [m for m in compiled.gpt.generate.model.modules() if isinstance(m, GemvLinear)]
    assert len({t.weight.untyped_storage().data_ptr() for t in fp32}) > 1


def test_inputs_failing_the_saved_guards_run_just_in_time(compiled):
    from quantkit.compile_artifacts import Precompiled
    from quantkit.generate import prefill, prefill_positions

    gen = compiled_decoding(compiled).functions
    pre = gen.prefill_fn().by_shape[gen.model.rows, gen.model.capacity]
    assert isinstance(pre, Precompiled)
    with torch.inference_mode():
        emb = torch.randn(1, 1, gen.model.llama.config.hidden_size)  # the prompt pass was traced for >= 2
    pad = torch.zeros(1, dtype=torch.long)
    args = (gen.model, emb, gen.model.slots[:1], prefill_positions(pad, 1), pad)
    ran = []
    jit, pre.fallback = pre.fallback, lambda *a: ran.append(1) or jit(*a)
    try:
        one = gen.prefill_fn()(*args)
    finally:
        pre.fallback = jit
    assert ran == [1] and not pre.fn.guard_check(*args)
    torch.testing.assert_close(one, prefill(*args), rtol=1e-5, atol=1e-5)


ISA_CHILD = """
import json, sys
from torch._inductor import cpu_vec_isa

real, runs = cpu_vec_isa.VecISA.check_build, []
cpu_vec_isa.VecISA.check_build = lambda isa, code: runs.append(str(isa)) or real(isa, code)
if sys.argv[1] == "quantkit":
    from quantkit.inductor import skip_vec_isa_probe

    skip_vec_isa_probe()
isa = cpu_vec_isa.pick_vec_isa()
print(json.dumps({"picked": [str(isa), isa.build_arch_flags()],
                  "valid": [str(v) for v in cpu_vec_isa.valid_vec_isa_list()], "runs": runs}))
"""


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 Linux only")
def test_inductor_isa_checks_run_once_per_machine(tmp_path):
    """With quantkit's setting Inductor picks the vector ISA its own full probe picks, running the
    build checks in the first process only: a later one answers them from quantkit's cache."""
    env = {**os.environ, "QUANTKIT_CACHE": str(tmp_path / "qc"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}

    def child(mode: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", ISA_CHILD, mode], capture_output=True, text=True,
                              env=env, timeout=300, check=True)
        return json.loads(proc.stdout.splitlines()[-1])

    torch_own = child("torch")
    (tmp_path / "qc").mkdir()
    (tmp_path / "qc" / "vec_isa_checks.json").write_text("[]")  # not answers: checked for real
    first, later = child("quantkit"), child("quantkit")
    assert first["picked"] == later["picked"] == torch_own["picked"]
    assert first["valid"] == later["valid"] == torch_own["valid"]
    assert first["runs"] and later["runs"] == []
    assert len(torch_own["runs"]) > len(first["runs"])  # the base checks, answered by the CPU flags
    assert (tmp_path / "qc" / "vec_isa_checks.json").is_file()


@pytest.mark.parametrize("recipe", ["int8-dynamic-compiled", "bf16-compiled"])
def test_decoder_layers_are_traced_once_and_reused(recipe, tiny_dir):
    """The step's graph holds one compiled region that every decoder layer calls (Dynamo reuses a
    region only where the layers' inputs match in layout and share no storage)."""
    from quantkit.generate import decode_step

    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe(recipe))
    fns = compiled_decoding(chat).functions
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(decode_step, fullgraph=True, backend=backend)(*fns.example_inputs(fns.default))
    (gm,) = graphs
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "invoke_subgraph" in str(n.target)]
    regions = {n.args[0].target for n in calls}
    assert len(calls) == chat.gpt.gpt.config.num_hidden_layers >= 2 and len(regions) == 1


def test_compile_mode_auto_is_cuda_graphs_on_cuda_only():
    from quantkit.inductor import for_device, uses_cuda_graphs
    from quantkit.recipes import parse_recipe

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = get_recipe("bf16-compiled").compile
    assert auto.mode == "auto" == parse_recipe("r", {"compile": {"enabled": True}}).compile.mode
    assert for_device(auto, cpu).mode == "default" and not uses_cuda_graphs(for_device(auto, cpu), cpu)
    assert for_device(auto, cuda).mode == "reduce-overhead" and uses_cuda_graphs(for_device(auto, cuda), cuda)
    explicit = dataclasses.replace(auto, mode="max-autotune-no-cudagraphs")
    assert for_device(explicit, cuda) is explicit and not uses_cuda_graphs(explicit, cuda)
    assert not uses_cuda_graphs(dataclasses.replace(auto, mode="reduce-overhead"), cpu)


def test_a_bf16_kv_cache_keeps_the_compiled_path_and_its_predictions(tiny_dir):
    """``kv_cache = "bf16"`` stores keys and values in bf16 (half of what a long call's steps
    read); teacher-forced on the same tokens, it predicts what the fp32 cache predicts. The
    shipped int8-dynamic-compiled uses it."""
    from quantkit.compile import compiled_decoding
    from quantkit.metrics import fidelity
    from quantkit.synth import teacher_forced

    ref, kv = load_chat("synthetic-tiny"), load_chat("synthetic-tiny")
    assert get_recipe("int8-dynamic-compiled").compile.kv_cache == "bf16"
    apply_recipe(ref, fp32_cache(get_recipe("int8-dynamic-compiled")))
    apply_recipe(kv, get_recipe("int8-dynamic-compiled"))
    assert all(layer.k_cache.dtype == torch.bfloat16 for layer in compiled_decoding(kv).model.layers)
    assert all(layer.k_cache.dtype == torch.float32 for layer in compiled_decoding(ref).model.layers)
    tokens = synthesize(ref, TEXTS[1], seed=4, steps=40).tokens
    a, b = teacher_forced(ref, TEXTS[1], tokens, seed=4), teacher_forced(kv, TEXTS[1], tokens, seed=4)
    assert fidelity(a.logprobs, b.logprobs, a.logmel, b.logmel).token_agreement > 0.95
    out = synthesize(kv, TEXTS[0], seed=1, steps=30)
    assert compiled_decoding(kv).last_steps[0] == out.steps - 1  # decoded on the compiled path


def test_the_saved_step_is_for_a_fresh_processs_cache_shape(compiled, tmp_path, monkeypatch):
    """After a batch has left the cache at two rows, what is saved is still the steps and prompt
    pass for one row at the recipe's capacity, the shape a fresh process starts with."""
    from quantkit.compile_artifacts import Precompiled, save_precompiled

    fns = compiled_decoding(compiled).functions
    synthesize(compiled, TEXTS[0], seed=1, steps=4)  # one row: the functions a fresh process needs
    compiled.infer(TEXTS[:2], skip_refine_text=True, params_infer_code=compiled.InferCodeParams(
        manual_seed=1, max_new_token=4, show_tqdm=False))
    step, first = fns.step_for(fns.default), fns.prefill_fn()
    assert fns.model.rows == 2 and (2, fns.model.base) in step.by_shape
    saved = []
    monkeypatch.setattr(Precompiled, "save", lambda self, path: saved.append(self))
    _, _, buckets = save_precompiled(fns, tmp_path)
    one_row, text = (1, fns.model.base), fns.step_for(fns.text_default, text=True)
    assert saved == [step.by_shape[one_row], first.by_shape[one_row], text.by_shape[one_row]]
    assert buckets == [{"rows": 1, "file": "decode_step.aot", "prefill": "prefill.aot", "text_step": "text_step.aot"}]
    assert (fns.model.rows, fns.model.capacity) == one_row
