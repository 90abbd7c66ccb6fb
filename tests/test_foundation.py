import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, run_cli, run_cli_here
from quantkit.apply import apply_recipe, component_dtype
from quantkit.errors import QuantkitError
from quantkit.models import load_chat
from quantkit.quantize import is_quantized_linear, module_weight_bytes
from quantkit.quiet import quieted
from quantkit.recipes import get_recipe, recipe_names
from quantkit.synth import expected_samples, fixed_speaker, synthesize

SHIPPED = ["stock", "fp32", "fp16", "bf16", "int8-weight-only", "int8-dynamic",
           "int8-dynamic-fbgemm", "bnb-int8"]
TEXT = "The birch canoe slid on the smooth planks."


def test_required_recipes_ship():
    assert set(SHIPPED) <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_makes_audio_of_the_expected_length(name, tiny_chat):
    # compiled recipes run their static-cache step eagerly here; test_compile.py compiles
    apply_recipe(tiny_chat, get_recipe(name), compile_step=False)
    out = synthesize(tiny_chat, TEXT, seed=3, steps=24)
    assert out.steps == 24
    assert out.wav.shape == (expected_samples(24),)
    assert np.isfinite(out.wav).all()
    assert np.sqrt(np.mean(out.wav ** 2)) > 1e-4  # not silent


def test_same_seed_same_audio_other_seed_other_audio(tiny_chat):
    a = synthesize(tiny_chat, TEXT, seed=7, steps=16)
    b = synthesize(tiny_chat, TEXT, seed=7, steps=16)
    c = synthesize(tiny_chat, TEXT, seed=8, steps=16)
    assert np.array_equal(a.wav, b.wav) and torch.equal(a.tokens, b.tokens)
    assert not np.array_equal(a.wav, c.wav)


@pytest.mark.parametrize("name", ["int8-weight-only", "int8-dynamic", "int8-dynamic-fbgemm", "bnb-int8"])
def test_int8_recipes_really_quantize_the_gpt(name, tiny_dir):
    fp32 = load_chat("synthetic-tiny")
    fp32_bytes = module_weight_bytes(fp32.gpt.gpt)
    chat = load_chat("synthetic-tiny")
    apply_recipe(chat, get_recipe(name))
    linears = [m for m in chat.gpt.gpt.modules()
               if isinstance(m, nn.Linear) or is_quantized_linear(m)]
    assert linears and all(is_quantized_linear(m) for m in linears)
    ratio = module_weight_bytes(chat.gpt.gpt) / fp32_bytes
    assert 0.2 < ratio < 0.32, ratio  # int8 weights plus per-channel scales and fp32 norms
    # heads were folded, not quantized: plain fp32 Linears without a parametrization
    for head in chat.embed.head_code:
        assert type(head) is nn.Linear and head.weight.dtype == torch.float32


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_recipes_cast_every_component(name, dtype, tiny_chat):
    fp32_bytes = module_weight_bytes(tiny_chat.gpt.gpt)
    apply_recipe(tiny_chat, get_recipe(name))
    for comp in ("gpt", "heads", "decoder", "vocos"):
        assert component_dtype(tiny_chat, comp) == dtype, comp
    assert module_weight_bytes(tiny_chat.gpt.gpt) == fp32_bytes // 2
    # the parts that must stay fp32 did
    assert tiny_chat.vocos.head.out.weight.dtype == torch.float32


def test_fold_keeps_head_outputs(tiny_chat):
    head = tiny_chat.embed.head_code[0]
    x = torch.randn(2, tiny_chat.config.gpt.hidden_size)
    before = head(x)
    apply_recipe(tiny_chat, get_recipe("fp32"))
    assert not hasattr(tiny_chat.embed.head_code[0], "parametrizations")
    torch.testing.assert_close(tiny_chat.gpt.head_code[0](x), before)


def test_loads_through_chattts_own_loader(tiny_dir, monkeypatch):
    import ChatTTS

    calls = []
    real = ChatTTS.Chat._load
    monkeypatch.setattr(ChatTTS.Chat, "_load", lambda self, **kw: calls.append(kw) or real(self, **kw))
    chat = load_chat("synthetic-tiny")
    assert isinstance(chat, ChatTTS.Chat) and len(calls) == 1
    assert calls[0]["gpt_ckpt_path"].endswith("asset/gpt")
    assert chat.gpt.gpt.config.hidden_size == 64
    assert chat.tokenizer.spk_emb_ids != chat.tokenizer._tokenizer.unk_token_id


@pytest.mark.slow
def test_full_size_synthetic_has_chattts_dimensions():
    from quantkit.models import load_chat

    chat = load_chat("synthetic")
    n_gpt = sum(p.numel() for p in chat.gpt.gpt.parameters())
    assert chat.gpt.gpt.config.num_hidden_layers == 20 and chat.gpt.gpt.config.hidden_size == 768
    assert 180e6 < n_gpt < 200e6  # ChatTTS's GPT: 189M parameters (token embedding removed)
    out = synthesize(chat, TEXT, seed=0, steps=4)
    assert out.wav.shape == (expected_samples(4),)


def test_asset_directory_source(tiny_dir, tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(tiny_dir, copy)
    chat = load_chat(str(copy))
    assert synthesize(chat, TEXT, steps=4).steps == 4


def test_synthetic_weights_written_by_two_threads_at_once_are_the_seeded_ones(tiny_dir, tmp_path, monkeypatch):
    """A first use writes the weights from torch's shared random state under a seed: two threads
    writing at once must not draw each other's numbers, and the caller's random state stays."""
    import threading

    from quantkit.models import ASSET_FILES, synthetic_dir

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    state = torch.random.get_rng_state()
    start, written = threading.Barrier(2), []

    def write():
        start.wait()
        written.append(synthetic_dir("synthetic-tiny"))

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert written == [tmp_path / "models" / "synthetic-tiny"] * 2
    for name in (f for f in ASSET_FILES if f.endswith(".safetensors")):
        assert (written[0] / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_a_synthetic_write_killed_midway_leaves_no_copy_behind(tiny_dir, tmp_path):
    """A writer killed midway (SIGKILL, the out-of-memory killer) leaves its unfinished copy, about
    1 GB for full-size weights: the next writer removes it, and writes the seeded weights."""
    import os
    import time

    from quantkit.models import ASSET_FILES

    env = {**os.environ, "QUANTKIT_CACHE": str(tmp_path)}
    write = "from quantkit.models import synthetic_dir; print(synthetic_dir('synthetic-tiny'))"
    first = subprocess.Popen([sys.executable, "-c", write], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("models/.synthetic-tiny-*")):
        assert first.poll() is None and time.monotonic() < deadline, "the write never started"
        time.sleep(0.01)
    first.kill()
    first.wait()
    assert list(tmp_path.glob("models/.synthetic-tiny-*"))
    proc = subprocess.run([sys.executable, "-c", write], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["synthetic-tiny", "write.lock"]
    for name in (f for f in ASSET_FILES if f.endswith(".safetensors")):
        assert (tmp_path / "models" / "synthetic-tiny" / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_damaged_asset_directory_is_a_clear_error(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    target = broken / "asset" / "Embed.safetensors"
    target.write_bytes(target.read_bytes()[: 1000])
    with pytest.raises(QuantkitError, match="damaged"):
        load_chat(str(broken))
    (broken / "asset" / "gpt" / "model.safetensors").unlink()
    proc = run_cli("apply", "fp32", "--model", str(broken), "--steps", "4")
    assert_one_line_error(proc, "incomplete", "asset/gpt/model.safetensors")


def test_real_weights_unavailable_fail_fast_with_a_hint(tmp_path):
    proc = run_cli("apply", "stock", "--model", "chattts", timeout=120,
                   env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "--model synthetic")


@pytest.mark.parametrize("body,fragment", [
    ('[gpt]\ndtype = "fp32"\nspeed = 3\n', "unknown key 'speed' in [gpt]"),
    ('[gpt]\nquantize = "int3-magic"\n', "gpt.quantize = 'int3-magic' is not allowed"),
    ('[decoder]\ndtype = "fp8"\n', "decoder.dtype = 'fp8' is not allowed"),
    ('[compile]\nkv_cache = "int4"\n', "compile.kv_cache = 'int4' is not allowed"),
    ('[heads]\nquantize = "int8-dynamic"\n', "needs weight_norm = 'fold'"),
    ('colour = "red"\n', "unknown key 'colour'"),
    ('[gpt\n', "not valid TOML"),
])
def test_malformed_recipes_exit_2_naming_the_problem(tmp_path, body, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    assert_one_line_error(run_cli_here("apply", str(path), "--model", "synthetic-tiny"), fragment)


def test_unknown_recipe_model_and_device(tiny_dir):
    assert_one_line_error(run_cli_here("apply", "int9"), "unknown recipe 'int9'", "stock")
    assert_one_line_error(run_cli_here("apply", "fp32", "--model", "nope"), "unknown model 'nope'")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli_here("apply", "fp32", "--model", "synthetic-tiny", "--device", "cuda"),
                              "no CUDA")


def test_component_a_device_cannot_run_names_recipe_component_and_reason(tiny_chat):
    tiny_chat.device = torch.device("cuda")  # fbgemm's check refuses before touching a GPU
    with pytest.raises(QuantkitError) as err:
        apply_recipe(tiny_chat, get_recipe("int8-dynamic-fbgemm"))
    assert "'int8-dynamic-fbgemm'" in str(err.value) and "component gpt" in str(err.value)
    assert "CPU only" in str(err.value)


def test_what_cannot_run_on_a_device_is_refused_before_loading():
    from quantkit.apply import check_runnable
    from quantkit.evaluate import _default_recipes, plan_recipes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects: no GPU is touched
    with pytest.raises(QuantkitError, match="impractically slow on CUDA.*use int8-dynamic-compiled"):
        check_runnable(get_recipe("int8-dynamic"), cuda)
    with pytest.raises(QuantkitError, match="component gpt .*CPU only"):
        plan_recipes(["fp32", "int8-dynamic-fbgemm"], cuda)  # eval refuses before any recipe runs
    for name in ("int8-dynamic-compiled", "fp8-weight-only-compiled", "int8-dynamic", "int8-dynamic-fbgemm"):
        check_runnable(get_recipe(name), cpu)
    check_runnable(get_recipe("int8-dynamic-compiled"), cuda)  # the compiled step's own int8 path
    on_cuda = _default_recipes(cuda)  # eval's default: what this device runs
    assert "int8-dynamic-compiled" in on_cuda and not {"int8-dynamic", "int8-dynamic-fbgemm"} & set(on_cuda)
    assert _default_recipes(cpu) == recipe_names()


def test_apply_cli_json_and_wav(tiny_dir, tmp_path):
    import json

    from quantkit.audio import read_wav

    wav = tmp_path / "out.wav"
    proc = run_cli("apply", "bf16", "--model", "synthetic-tiny", "--steps", "16", "--seed", "2",
                   "--out-wav", str(wav), "--json")
    assert proc.returncode == 0, proc.stderr
    # ChatTTS's loop (bf16 is not compiled) calls transformers' Llama the way it deprecates
    assert "deprecated" not in proc.stderr, proc.stderr
    assert "Loading weights" not in proc.stderr, proc.stderr  # transformers' per-tensor bar
    result = json.loads(proc.stdout)
    for key in ("recipe", "model", "device", "load_s", "apply_s", "first_call_s", "warm_s",
                "steps", "ms_per_step", "rtf", "weight_bytes", "wav"):
        assert key in result
    assert result["steps"] == 16 and result["weight_bytes"] > 0
    # the cold start a user waits for: imports, load, apply and the first call
    assert result["first_audio_since_process_start_s"] > result["load_s"] + result["apply_s"] + result["first_call_s"]
    audio, rate = read_wav(wav)
    assert rate == 24000 and audio.shape == (16 * 512 - 256,)


def test_the_seed_tool_times_stock_chattts_with_its_own_compile(tiny_dir):
    """tools/seed_compile.py (issue 23's baseline): ChatTTS loaded with compile=True, which it
    honours on CUDA only; here the CPU row."""
    import json

    tool = Path(__file__).parent.parent / "tools" / "seed_compile.py"
    proc = subprocess.run([sys.executable, str(tool), "--model", "synthetic-tiny", "--steps", "8", "--devices", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["device"] == "cpu" and row["chattts_compile"] and row["steps"] == 8
    assert row["first_call_s"] > 0 and row["warm_s"] > 0
    assert load_chat("synthetic-tiny", chattts_compile=True).compile  # passed on to ChatTTS's loader


def test_the_batch_tool_times_chat_infer_per_batch_size(tiny_dir):
    """tools/batch_throughput.py: warm Chat.infer calls of a compiled recipe at each batch size."""
    tool = Path(__file__).parent.parent / "tools" / "batch_throughput.py"
    proc = subprocess.run([sys.executable, str(tool), "--model", "synthetic-tiny", "--batches", "1,2",
                           "--steps", "8", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(": ")[1] for line in lines] == ["batch 1", "batch 2"]
    assert lines[0].endswith("throughput 1x batch 1, decode steps 1x")
    # three significant digits: a ratio stays above 0 on a machine busy enough to stall a call
    number = r"([\d.]+(?:e[+-]\d+)?)"
    found = re.fullmatch(rf".*: batch 2: [\d.]+ s, throughput {number}x batch 1, decode steps {number}x", lines[1])
    assert found and float(found[1]) > 0 and float(found[2]) > 0  # the compiled step timed the steps apart


def test_recipes_command_lists_names_and_descriptions():
    proc = run_cli("recipes")
    assert proc.returncode == 0
    for name in SHIPPED:
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines())


def test_every_command_and_option_explains_itself_and_synth_defaults_to_chattts_length():
    import argparse

    from ChatTTS import Chat

    from quantkit.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        assert command.description, name
        unexplained = [a.dest for a in command._actions if not a.help]
        assert not unexplained, (name, unexplained)
    for argv in (["synth", "--variant", "v", "--text", "t", "--out-wav", "o.wav"], ["apply", "fp32"]):
        assert parser.parse_args(argv).max_new_tokens == Chat.InferCodeParams().max_new_token


def test_atomic_writes_keep_the_old_file_when_a_write_fails(tmp_path):
    from quantkit.atomic import atomic_path, write_text

    target = tmp_path / "out" / "report.md"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]  # no temporaries left
    assert target.stat().st_mode & 0o777 == 0o644


def test_public_api_takes_a_name_a_path_or_a_recipe(tiny_dir):
    """quantkit.load_chat / apply_recipe, then ChatTTS's own infer, as a user writes it."""
    import quantkit
    from quantkit.recipes import RECIPES_DIR

    for recipe in ("bf16", RECIPES_DIR / "bf16.toml", get_recipe("bf16")):
        chat = quantkit.load_chat("synthetic-tiny")
        quantkit.apply_recipe(chat, recipe)
        assert chat.gpt.gpt.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
        params = chat.InferCodeParams(manual_seed=1, max_new_token=8, min_new_token=8, show_tqdm=False)
        (wav,) = chat.infer(["Hello."], skip_refine_text=True, params_infer_code=params)
        assert wav.ndim == 1 and wav.shape[0] > 0
    with pytest.raises(QuantkitError, match="unknown recipe"):
        quantkit.apply_recipe(quantkit.load_chat("synthetic-tiny"), "no-such-recipe")
    # A second recipe would cast and quantize what the first left: refused, the first one kept.
    with pytest.raises(QuantkitError, match="already has recipe 'bf16' applied"):
        quantkit.apply_recipe(chat, "int8-dynamic")
    assert chat.gpt.gpt.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert chat.infer(["Hello."], skip_refine_text=True, params_infer_code=params)[0].shape == wav.shape
    stock = quantkit.load_chat("synthetic-tiny")
    quantkit.apply_recipe(stock, "stock")  # ChatTTS as loaded: any recipe may follow
    quantkit.apply_recipe(stock, "bf16")


def test_a_recipe_needs_a_loaded_chat_and_leaves_the_random_state(tiny_dir):
    """A Chat whose ``load`` failed (ChatTTS returns False and logs) is one clear error, not an
    AttributeError; applying a recipe draws nothing from torch's shared random state."""
    import ChatTTS

    import quantkit

    with pytest.raises(QuantkitError, match="this Chat is not loaded .*gpt"):
        quantkit.apply_recipe(ChatTTS.Chat(), "bf16")
    chat = quantkit.load_chat("synthetic-tiny")
    state = torch.random.get_rng_state()
    quantkit.apply_recipe(chat, "bf16")  # probes every component on the device
    assert torch.equal(torch.random.get_rng_state(), state)


def test_overlapping_quiet_blocks_leave_the_logger_as_they_found_it(caplog):
    """Two threads' blocks on one logger (ChatTTS's, warming the normalizer of two Chats loaded at
    once), the first ending before the second: each hides only while it runs."""
    log = logging.getLogger("quantkit.tests.quieted")
    first, second = quieted(log), quieted(log)
    with caplog.at_level(logging.INFO, logger=log.name):
        first.__enter__()
        second.__enter__()
        log.warning("hidden")
        first.__exit__(None, None, None)
        log.warning("still hidden")
        second.__exit__(None, None, None)
        log.warning("shown")
        log.error("shown too")
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["shown", "shown too"]


def test_a_fixed_speaker_is_chattts_own_draw_and_leaves_the_shared_random_state(tiny_chat):
    state = torch.random.get_rng_state()
    speaker = fixed_speaker(tiny_chat, 7)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    assert speaker == tiny_chat.sample_random_speaker() != fixed_speaker(tiny_chat, 8)
