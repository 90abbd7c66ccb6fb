import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from pathlib import Path

import quantkit
from conftest import TEXTS, assert_one_line_error, recording, run_cli, run_cli_here
from quantkit import chattts, export as export_mod, int8_gemv
from quantkit.apply import apply_recipe
from quantkit.errors import QuantkitError
from quantkit.export import SCHEMA, export_variant, load_variant
from quantkit.models import load_chat
from quantkit.recipes import get_recipe
from quantkit.synth import fixed_speaker, synthesize

TEXT = "Glue the sheet to the dark blue background."


@pytest.fixture(scope="module")
def variants(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: Path(export_variant(root / name, recipe=name, model="synthetic-tiny")["out"])
            for name in ("fp16", "bf16", "int8-dynamic", "int8-dynamic-fbgemm", "fp32")}



@pytest.mark.parametrize("name", ["fp16", "bf16", "int8-dynamic", "int8-dynamic-fbgemm"])
def test_round_trip_gives_the_same_audio(variants, name):
    applied = load_chat("synthetic-tiny")
    apply_recipe(applied, get_recipe(name))
    loaded = quantkit.load_variant(variants[name])
    a = synthesize(applied, TEXT, seed=4, steps=24)
    b = synthesize(loaded, TEXT, seed=4, steps=24)
    assert torch.equal(a.tokens, b.tokens)
    assert np.array_equal(a.wav, b.wav)


def test_a_variant_loads_however_this_python_pickles_enums(tmp_path, monkeypatch, tiny_dir):
    """Debian's Python 3.11.2 pickles an enum member as getattr(Class, name), a global torch's
    weights-only loader refuses; a torchao weight holds enums (int8-dynamic: its mapping type)."""
    import enum

    monkeypatch.setattr(enum.Enum, "__reduce_ex__", lambda self, proto: (getattr, (type(self), self._name_)))
    out = export_variant(tmp_path / "v", recipe="int8-dynamic", model="synthetic-tiny")["out"]
    monkeypatch.undo()
    chat = quantkit.load_variant(out)
    assert type(chat.gpt.gpt.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"


def test_manifest_and_sizes(variants):
    m = json.loads((variants["int8-dynamic"] / "manifest.json").read_text())
    assert m["schema"] == SCHEMA and m["recipe"]["name"] == "int8-dynamic"
    assert m["recipe"]["gpt"]["quantize"] == "int8-dynamic" and m["device"] == "cpu"
    assert m["gpt_weights"]["format"] == "torch"  # torchao tensor subclasses
    assert {"torch", "torchao", "chattts", "transformers"} <= set(m["versions"])
    assert len(m["source"]["sha256"]) == 64 and all(len(h) == 64 for h in m["files"].values())
    assert not (variants["int8-dynamic"] / "asset" / "gpt" / "model.safetensors").exists()
    fp32 = json.loads((variants["fp32"] / "manifest.json").read_text())
    assert fp32["gpt_weights"]["format"] == "safetensors"
    int8 = (variants["int8-dynamic"] / "gpt.pt").stat().st_size
    full = (variants["fp32"] / "gpt.safetensors").stat().st_size
    assert 0.2 < int8 / full < 0.35  # int8 weights + scales against fp32
    half = (variants["bf16"] / "gpt.safetensors").stat().st_size
    assert 0.45 < half / full < 0.55


def test_fresh_process_loads_and_synthesizes(variants, tmp_path):
    wav = tmp_path / "out.wav"
    proc = run_cli("synth", "--variant", str(variants["int8-dynamic"]), "--text", TEXT,
                   "--out-wav", str(wav), "--steps", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr, proc.stderr  # transformers' per-tensor bar
    from quantkit.audio import read_wav

    audio, rate = read_wav(wav)
    assert rate == 24000 and audio.shape == (12 * 512 - 256,) and np.abs(audio).max() > 0


def test_loads_in_other_threads_get_their_own_gpt_while_a_variant_loads(variants, tiny_dir):
    """A variant's load answers ChatTTS's LlamaModel.from_pretrained, a module attribute every
    thread sees: a load in another thread meanwhile (ChatTTS's own, or another variant's) still
    gets its own GPT, and ChatTTS's class is back once no load is left."""
    import ChatTTS.model.gpt as chattts_gpt

    original, before = chattts_gpt.LlamaModel, load_chat("synthetic-tiny")
    inside, release = threading.Event(), threading.Event()

    def held(*_args, **_kwargs):
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("the main thread's load got the worker's GPT")
        inside.set()
        return "held" if release.wait(120) else "timed out"

    def hold():
        with chattts.StoredGPT(held):
            return chattts_gpt.LlamaModel.from_pretrained("unused")

    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(hold)
        assert inside.wait(120)
        try:
            plain, fp16 = load_chat("synthetic-tiny"), load_variant(variants["fp16"])
        finally:
            release.set()
        assert worker.result() == "held"
    assert chattts_gpt.LlamaModel is original
    assert type(chattts.gpt(plain)) is original
    for ours, theirs in zip(chattts.gpt(plain).state_dict().values(), chattts.gpt(before).state_dict().values()):
        assert torch.equal(ours, theirs)
    assert {p.dtype for p in chattts.gpt(fp16).parameters()} == {torch.float16}


def _copy(variant, tmp_path):
    dst = tmp_path / "v"
    shutil.copytree(variant, dst)
    return dst


def test_corrupted_weights(variants, tmp_path):
    v = _copy(variants["bf16"], tmp_path)
    data = bytearray((v / "gpt.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (v / "gpt.safetensors").write_bytes(bytes(data))
    assert_one_line_error(run_cli("synth", "--variant", str(v), "--text", "x", "--out-wav",
                                  str(tmp_path / "x.wav")), "gpt.safetensors does not match its hash")
    assert not (tmp_path / "x.wav").exists()


def test_edited_manifest(variants, tmp_path):
    v = _copy(variants["bf16"], tmp_path)
    m = json.loads((v / "manifest.json").read_text())
    m["schema"] = 99
    (v / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(QuantkitError, match="unsupported manifest schema 99"):
        load_variant(v)
    (v / "manifest.json").write_text("{broken")
    with pytest.raises(QuantkitError, match="not valid JSON"):
        load_variant(v)


def test_missing_file(variants, tmp_path):
    v = _copy(variants["int8-dynamic"], tmp_path)
    (v / "asset" / "Vocos.safetensors").unlink()
    assert_one_line_error(run_cli("synth", "--variant", str(v), "--text", "x", "--out-wav",
                                  str(tmp_path / "x.wav")), "missing asset/Vocos.safetensors")


def test_version_mismatch(variants, tmp_path):
    v = _copy(variants["bf16"], tmp_path)
    m = json.loads((v / "manifest.json").read_text())
    m["versions"]["torch"] = "1.0.0"
    (v / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run_cli("synth", "--variant", str(v), "--text", "x", "--out-wav",
                                  str(tmp_path / "x.wav")), "torch 1.0.0")


def test_interrupted_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def boom(*_args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "_write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_variant(tmp_path / "v", recipe="bf16", model="synthetic-tiny")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_needs_force(variants, tmp_path):
    out = tmp_path / "v"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli_here("export", "fp16", "--model", "synthetic-tiny", "--out", str(out)),
                          "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder: --force may use it
    proc = run_cli("export", "fp16", "--model", "synthetic-tiny", "--out", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").exists()


def test_export_best_from_an_eval_directory(tiny_dir, tmp_path):
    """The recommended recipe, and one that eval was given as a .toml path (exported from it)."""
    recipe = tmp_path / "mine.toml"
    recipe.write_text('description = "mine"\n[gpt]\ndtype = "bf16"\n')
    ev = tmp_path / "eval"
    proc = run_cli("eval", "--model", "synthetic-tiny", "--recipes", f"int8-dynamic,{recipe}", "--limit", "1",
                   "--max-new-tokens", "8", "--runs", "1", "--skip-asr", "--skip-call-shapes", "--skip-quality", "--out", str(ev))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((ev / "results.json").read_text())
    proc = run_cli("export", "--best", str(ev), "--out", str(tmp_path / "v"))  # the eval's model
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert m["recipe"]["name"] == doc["recommendation"]["name"] and "token_agreement" in m["chosen_by"]["fidelity"]
    assert m["source"]["model"] == m["chosen_by"]["model"] == "synthetic-tiny" and m["device"] == "cpu"
    doc["recommendation"] = {"name": "mine", "reason": "chosen by the test"}
    (ev / "results.json").write_text(json.dumps(doc))
    proc = run_cli("export", "--best", str(ev), "--model", str(tiny_dir), "--out", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    assert f"exporting model '{tiny_dir}' with the recipe an eval of model 'synthetic-tiny' recommended" in proc.stderr
    m = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert m["recipe"]["name"] == "mine" and m["recipe"]["gpt"]["dtype"] == "bf16"
    assert_one_line_error(run_cli_here("export", "--model", "synthetic-tiny", "--out", str(tmp_path / "x")),
                          "either a RECIPE or --best")


# A fresh process: the variant loaded twice at once (a Chat per thread, as a server would) and
# each one's one-row call, then a batch of the texts given (if any) on the first, with the graphs
# it traced or compiled and the tokens each call decoded.
FRESH = """
import json, sys, threading, torch, quantkit
from concurrent.futures import ThreadPoolExecutor
from quantkit.compile import compiled_decoding
from quantkit.synth import fixed_speaker, synthesize
start = threading.Barrier(2)
def load(_):
    start.wait()
    c = quantkit.load_variant(sys.argv[1], trust_compiled=True)
    model = compiled_decoding(c).model
    cache_rows = model.layers[0].k_cache.shape[0], model._held[0].shape[0]
    return c, cache_rows, synthesize(c, sys.argv[2], seed=0, steps=12).tokens.tolist()
with ThreadPoolExecutor(2) as pool:
    (c, cache_rows, one), (_, _, other) = pool.map(load, range(2))
compiled, seen, inner = compiled_decoding(c), [], c.gpt.generate
def generate(*args, **kwargs):
    for out in inner(*args, **kwargs):
        seen.append([ids.tolist() for ids in out.ids])
        yield out
c.gpt.generate = generate
code = c.InferCodeParams(spk_emb=fixed_speaker(c, 3), manual_seed=5, max_new_token=10, min_new_token=10,
                         show_tqdm=False)
if json.loads(sys.argv[3]):
    c.infer(json.loads(sys.argv[3]), skip_refine_text=True, params_infer_code=code, do_text_normalization=False,
            split_text=False)
batch = [seen[-1], compiled.last_steps[0]] if seen else None
print(json.dumps([torch._dynamo.utils.counters["stats"]["unique_graphs"], [one, other], batch, cache_rows]))
"""


def _eager_tokens(recipe: str) -> tuple[list, list]:
    """The recipe's tokens for FRESH's two calls (the batch of TEXTS), decoded by its uncompiled step."""
    applied = load_chat("synthetic-tiny")
    apply_recipe(applied, get_recipe(recipe), compile_step=False)
    one = synthesize(applied, TEXT, seed=0, steps=12).tokens.tolist()
    code = applied.InferCodeParams(spk_emb=fixed_speaker(applied, 3), manual_seed=5, max_new_token=10,
                                   min_new_token=10, show_tqdm=False)
    with recording(applied) as seen:
        applied.infer(TEXTS, skip_refine_text=True, params_infer_code=code, do_text_normalization=False,
                      split_text=False)
    return one, [ids.tolist() for ids in seen[-1]]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,batches", [("fp32-compiled", [1]), ("int8-dynamic-compiled", [1, 3])])
def test_compiled_variant_starts_without_compiling(recipe, batches, tiny_dir, tmp_path):
    """A batch of three runs in the bucket of four rows: a variant exported for it carries that
    bucket's step and prompt pass too, and a fresh process compiles nothing for either call, with
    the variant loaded in two threads at once."""
    texts = TEXTS if 3 in batches else []
    info = export_variant(tmp_path / "v", recipe=recipe, model="synthetic-tiny", batches=batches)
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())["compile_artifacts"]
    carried = [1] + [b["rows"] for b in manifest["batch_buckets"]]
    assert carried == ([1, 4] if 3 in batches else [1])
    assert info["compile_artifacts"] and all(
        (tmp_path / "v" / f).stat().st_size > 0 for b in [manifest, *manifest["batch_buckets"]]
        for f in (b["file"], b["prefill"]))
    expected = _eager_tokens(recipe)
    # The graphs' C++ kernels (*.main.so) shipped are this process's own builds, copied, not built
    # again for the variant.
    kernels = tmp_path / "v" / "inductor"
    libs = list(kernels.rglob("*.main.so"))
    shipped = {p.name: p.stat().st_mtime for p in libs}
    assert shipped
    maps = [line.split(None, 5) for line in Path("/proc/self/maps").read_text().splitlines()]
    loaded = {Path(f[5]).name: Path(f[5]) for f in maps if len(f) == 6 and f[5].endswith(".so")}
    for lib in libs:  # the very libraries this process loaded, wherever from (copy2 keeps mtimes)
        assert loaded[lib.name].stat().st_mtime == shipped[lib.name], lib.name
    assert (manifest["kernel"] is not None) == (recipe == "int8-dynamic-compiled" and int8_gemv.cpu_supported())
    # Empty caches: neither Inductor's nor a built int8 kernel to fall back on (nor the record
    # that this machine exported the variant: hence trust_compiled).
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh"),
           "QUANTKIT_CACHE": str(tmp_path / "fresh-quantkit")}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "v"), TEXT, json.dumps(texts)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    graphs, ones, batch, cache_rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert graphs == 0  # nothing traced or compiled in the fresh process
    # loaded at one row, in the first rows of the largest carried bucket's cache, made at load
    assert cache_rows == [1, max(carried)]
    # The fresh process used the variant's kernels, none rebuilt (a rebuilt one is newer;
    # Inductor's one-line ISA checks are built per machine).
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "fresh").rglob("*.main.so")} == shipped
    assert not (tmp_path / "fresh-quantkit" / "kernels").exists()  # the variant's kernel, not rebuilt
    assert ones == [expected[0]] * 2  # the same tokens from both threads' Chats
    if texts:  # on the compiled path (the prompt pass gives the first of 10 tokens), ChatTTS's tokens
        assert batch == [expected[1], 9]


# ChatTTS's default call: a text of several sentences is refined as a batch of its sentences, then
# its first sentence is spoken alone (the speaker prompt), then all of them as a batch. Each step
# call is recorded: a text step's tokens are one a row, and its guards must hold.
DEFAULTS = r"""
import json, sys, torch, quantkit
from quantkit import compile_artifacts
calls, inner = [], compile_artifacts.Precompiled.__call__
def call(self, *args):
    if len(args) > 5:
        calls.append([args[1].shape[0], "text" if args[1].shape[1] == 1 else "code", self.fn.guard_check(*args)])
    return inner(self, *args)
compile_artifacts.Precompiled.__call__ = call
chat = quantkit.load_variant(sys.argv[1])
torch.manual_seed(0)
wavs = chat.infer(sys.argv[2])
print(json.dumps([torch._dynamo.utils.counters["stats"]["unique_graphs"], sorted(set(map(tuple, calls))),
                  [w.size for w in wavs]]))
"""


@pytest.mark.slow
def test_a_variant_runs_chattts_default_call_without_compiling(tiny_dir, tmp_path):
    """``chat.infer(text)`` as ChatTTS's README has it (text refinement on, the text split into
    sentences run in batches) compiles nothing in a fresh process: by default export carries the
    decode step, the text step and the prompt pass for one row and for the buckets of 2 and 4."""
    proc = run_cli("export", "int8-dynamic-compiled", "--model", "synthetic-tiny", "--out", str(tmp_path / "v"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())["compile_artifacts"]
    assert [b["rows"] for b in manifest["batch_buckets"]] == [2, 4]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh")}
    text = "Glue the sheet to the dark blue background. It is easy to tell the depth of a well. Rice is often served."
    proc = subprocess.run([sys.executable, "-c", DEFAULTS, str(tmp_path / "v"), text], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "does not cover" not in proc.stderr, proc.stderr  # no call fell back to ChatTTS's loop
    graphs, calls, sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert graphs == 0  # nothing traced or compiled
    # refinement of the three sentences (bucket of 4), the first alone, then the three
    assert calls == [[1, "code", True], [4, "code", True], [4, "text", True]]
    assert len(sizes) == 1 and sizes[0] > 0  # split_text joins the sentences' audio


@pytest.mark.slow
def test_batches_without_ahead_of_time_steps_come_from_inductors_cache(tiny_dir, tmp_path):
    """Where a step cannot be compiled ahead of time (Inductor freezing here, CUDA always), a
    variant carries Inductor's cache of what export ran: export runs each batch bucket once, with
    text refinement, so that a fresh process's refined batch finds every kernel there. With torchao's weights, the
    fresh process (which loads them, not quantizes) compiles with the options torchao's
    quantize_ would have set process-wide: otherwise every key misses. Neither process tries
    to compile ahead of time what it cannot (each try compiled a shape in full, then failed)."""
    frozen = str(Path(__file__).parent / "data" / "recipes" / "int8-weight-only-frozen.toml")
    proc = run_cli("export", frozen, "--model", "synthetic-tiny", "--batches", "2", "--out", str(tmp_path / "v"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ahead-of-time" not in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "v" / "manifest.json").read_text())["compile_artifacts"]["kind"] == "inductor-cache"
    code = ("import json, sys, torch, quantkit; from quantkit.shapes import infer_fixed;"
            "c = quantkit.load_variant(sys.argv[1], trust_compiled=True);"
            "infer_fixed(c, ['Hi.', 'Hello there.'], 6, refine_steps=3);"
            "n = torch._dynamo.utils.counters['inductor'];"
            "print(json.dumps([n['fxgraph_cache_hit'], n['fxgraph_cache_miss']]))")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "ahead-of-time" not in proc.stderr, proc.stderr[-2000:]
    hits, misses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert hits >= 1 and misses == 0


def test_batches_need_a_compiled_recipe(tmp_path):
    assert_one_line_error(run_cli_here("export", "int8-dynamic", "--model", "synthetic-tiny", "--batches", "1,8",
                                       "--out", str(tmp_path / "v")), "is not compiled")
    assert_one_line_error(run_cli_here("export", "int8-dynamic-compiled", "--model", "synthetic-tiny",
                                       "--batches", "0", "--out", str(tmp_path / "v")), "--batches")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("recipe,fragment", [
    (str(Path(__file__).parent / "data" / "recipes" / "heads-int8.toml"), "quantized heads is not supported"),
    ("bnb-int8", "bitsandbytes int8 variants cannot be exported"),
    ("stock", "changes nothing"),
])
def test_recipes_that_cannot_be_exported_say_why(recipe, fragment, tmp_path):
    assert_one_line_error(run_cli("export", recipe, "--model", "synthetic-tiny", "--out", str(tmp_path / "v")),
                          fragment)
    assert not (tmp_path / "v").exists()
