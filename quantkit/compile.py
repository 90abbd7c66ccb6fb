"""Compiled decoding for ChatTTS's GPT: a static KV cache and one compiled decode step.

ChatTTS's own loop grows its KV cache and attention mask every step, so every step has new
shapes and torch.compile recompiles constantly. Here, as in gpt-fast's generate.py, the cache
has a fixed capacity (quantkit.static_cache) and the decode step (code embeddings ->
transformer -> code heads -> ChatTTS's sampling, quantkit.sampling -> next tokens) always sees
the same shapes but for the number of filled cache slots, which it takes as one symbolic size,
so it compiles once. The prompt pass (prefill) is compiled apart, its length one symbolic size
too. Saving and loading what was compiled: quantkit.compile_artifacts.

This module is the one place that replaces ChatTTS internals: ``GPT.generate``, for batch-1
code generation. Text refinement, streaming and batches fall back to ChatTTS's loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from quantkit.atomic import write_text
from quantkit.recipes import CompileSettings
from quantkit.sampling import ExpNoise, Sampling, draw, process_logits, sampling_from
from quantkit.static_cache import StaticCacheGPT

log = logging.getLogger(__name__)


def decode_step(model: StaticCacheGPT, ids: torch.Tensor, keys: torch.Tensor, window: torch.Tensor,
                temperature: torch.Tensor, mask_eos: torch.Tensor, noise: torch.Tensor,
                pos: torch.Tensor | None = None):
    """One step: the last tokens ids (1, num_vq), fed at position ``pos`` (default ``keys[-1:]``)
    and attending to the cache slots ``keys`` (``slots[:pos + 1]``, or every slot, masked, where
    ``model.full_keys``) -> (hidden (1, H), next tokens (1, num_vq), the penalty window with ids
    appended, whether a next token is EOS).

    A free function of the model (not a bound method) so that it can be compiled ahead of time
    and saved; the sampling constants come from ``model.sampling``."""
    window = torch.cat([window[:, 1:], ids.view(-1, 1)], 1)
    emb = torch.stack([emb(ids[:, i]) for i, emb in enumerate(model.emb_code)], 2).sum(2)
    hidden = model(emb[:, None].float(), keys[-1:] if pos is None else pos, keys)[:, -1]
    probs = process_logits(code_logits(model, hidden), window, temperature, mask_eos, model.sampling)
    nxt = draw(probs, noise)
    return hidden, nxt, window, nxt.eq(model.sampling.eos).any()


def prefill(model: StaticCacheGPT, emb: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The prompt's embeddings (1, L, H) into cache slots ``prompt`` (``slots[:L]``) -> the last
    hidden state (1, H). A free function, as decode_step, to be compiled ahead of time."""
    return model(emb, prompt, prompt)[:, -1]


def code_logits(model: StaticCacheGPT, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden (1, H) -> the four code heads' logits (num_vq, vocab), fp32."""
    return torch.stack(model.heads_code(hidden), 1).float()[0]


def compile_decode_step(settings: CompileSettings) -> Callable:
    return torch.compile(decode_step, fullgraph=True, dynamic=False, **compile_kwargs(settings))


def compile_prefill(settings: CompileSettings) -> Callable:
    """The prompt pass, compiled: eagerly, its ~30 small operations per layer around the int8
    products cost 55 ms of a 40-token prompt, compiled 38 (int8-dynamic, full-size synthetic, one
    process). Never as CUDA graphs: one graph would be recorded per prompt length."""
    return torch.compile(prefill, fullgraph=True, dynamic=False, **compile_kwargs(settings, cuda_graphs=False))


class CompiledGenerate:
    """Drop-in for ``GPT.generate`` (same arguments, same GenerationOutputs)."""

    def __init__(self, chat, settings: CompileSettings, compile_step: bool = True):
        self.chat = chat
        self.gpt = chat.gpt
        self.fallback = chat.gpt.generate
        device = torch.device(chat.device_gpt)
        self.settings = settings = for_device(settings, device)
        self.model = StaticCacheGPT(chat, settings.cache_capacity)
        # CUDA graphs replay a step recorded for one set of shapes: a step attending to the n
        # filled slots would record a graph for every n. With them, as in gpt-fast, a step
        # attends to every slot of the cache under a mask (one shape; on a GPU reading the
        # whole cache costs microseconds). Elsewhere it reads only the filled slots.
        self.graphs = compile_step and uses_cuda_graphs(settings, device)
        self.model.set_full_keys(self.graphs)
        # Just-in-time compiled functions, and the ahead-of-time ones used first where they
        # exist (loaded from a variant, or compiled at first use on CPU).
        self.step = compile_decode_step(settings) if compile_step else decode_step
        self.prefill = compile_prefill(settings) if compile_step else prefill
        self.precompiled: dict[Sampling, Callable] = {}
        self.precompiled_prefill: Callable | None = None
        # On CPU, compiled ahead of time at first use: the functions that `apply --compile-cache`
        # and export save are then the ones that ran (as fast as through Dynamo: +3% and -1.4% in
        # two in-process comparisons here). CUDA keeps just-in-time compilation: CUDA graphs are
        # untested ahead of time here.
        self.ahead = compile_step and self.model.slots.device.type == "cpu"
        self._interned: dict[Sampling, Sampling] = {}
        # (decode steps, seconds) of the last call (None where it ran ChatTTS's loop): the steps
        # alone, without the prompt pass and ChatTTS's work around the loop, for the evaluator.
        self.last_steps: tuple[int, float] | None = None

    def _use_sampling(self, s: Sampling) -> None:
        # One Sampling object per value: the compiled step guards on model.sampling.
        self.model.sampling = self._interned.setdefault(s, s)

    def _step_fn(self, s: Sampling):
        self._use_sampling(s)
        if s not in self.precompiled and self.ahead:
            self.precompiled[s] = _or_just_in_time(lambda: self.precompile_step(s), self.step)
        return self.precompiled.get(s, self.step)

    def precompile_step(self, s: Sampling) -> "Precompiled":
        """The decode step for sampling ``s`` compiled ahead of time (raises where that fails)."""
        return Precompiled(_aot(compile_decode_step, self.settings, self.example_inputs(s)), self.step)

    def precompile_prefill(self) -> "Precompiled":
        """The prompt pass compiled ahead of time (raises where that fails)."""
        return Precompiled(_aot(compile_prefill, self.settings, self.example_prompt()), self.prefill)

    def _prefill(self, emb: torch.Tensor) -> torch.Tensor:
        """The prompt (1, L, H) through the cache -> last hidden state (1, H)."""
        if not emb.is_inference():  # as ChatTTS's embeddings are: the saved prompt pass guards on it
            with torch.inference_mode():
                emb = emb.clone()
        prompt = self.model.slots[:emb.shape[1]]
        torch._dynamo.maybe_mark_dynamic(prompt, 0)  # one graph for every prompt length
        torch._dynamo.maybe_mark_dynamic(emb, 1)
        if self.precompiled_prefill is None and self.ahead:
            self.precompiled_prefill = _or_just_in_time(self.precompile_prefill, self.prefill)
        return (self.precompiled_prefill or self.prefill)(self.model, emb, prompt)

    def example_inputs(self, s: Sampling) -> tuple:
        num_vq = len(self.model.emb_code)
        device = self.model.slots.device
        self._use_sampling(s)
        keys = self.model.slots[:2]
        torch._dynamo.mark_dynamic(keys, 0)
        return (self.model, torch.zeros(1, num_vq, dtype=torch.long, device=device), keys,
                torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device),
                torch.ones(num_vq, 1, device=device), torch.tensor(False, device=device),
                torch.ones(num_vq, self.chat.config.gpt.num_audio_tokens, device=device))

    def example_prompt(self) -> tuple:
        """Arguments for compiling the prompt pass ahead of time (any length from 2)."""
        with torch.inference_mode():
            emb = torch.zeros(1, 2, self.model.llama.config.hidden_size, device=self.model.slots.device)
        prompt = self.model.slots[:2]
        torch._dynamo.mark_dynamic(emb, 1)
        torch._dynamo.mark_dynamic(prompt, 0)
        return self.model, emb, prompt

    def default_sampling(self) -> Sampling:
        """What ChatTTS's default InferCodeParams give (the harness uses them)."""
        from ChatTTS.model import gen_logits

        p = self.chat.InferCodeParams()
        num_code = self.chat.config.gpt.num_audio_tokens - 1
        warpers, processors = gen_logits(num_code=num_code, top_P=p.top_P, top_K=p.top_K,
                                         repetition_penalty=p.repetition_penalty)
        return sampling_from((*processors, *warpers), num_code)

    def __call__(self, emb, inputs_ids, temperature, eos_token, attention_mask=None, max_new_token=2048,
                 min_new_token=0, logits_processors=(), infer_text=False, return_attn=False,
                 return_hidden=False, stream=False, show_tqdm=True, ensure_non_empty=True,
                 stream_batch=24, manual_seed=None, context=None):
        self.last_steps = None
        s = sampling_from(logits_processors, int(eos_token))
        length = inputs_ids.shape[1]
        if (infer_text or stream or return_attn or inputs_ids.shape[0] != 1 or s is None
                or length + max_new_token > self.settings.cache_capacity
                or (attention_mask is not None and not bool(attention_mask.all()))):
            log.info("compiled decoding does not cover this call; using ChatTTS's loop")
            kwargs = dict(attention_mask=attention_mask, max_new_token=max_new_token,
                          min_new_token=min_new_token, logits_processors=logits_processors,
                          infer_text=infer_text, return_attn=return_attn, return_hidden=return_hidden,
                          stream=stream, show_tqdm=show_tqdm, ensure_non_empty=ensure_non_empty,
                          stream_batch=stream_batch, manual_seed=manual_seed)
            if context is not None:
                kwargs["context"] = context
            yield from self.fallback(emb, inputs_ids, temperature, eos_token, **kwargs)
            return
        yield self._generate(emb, inputs_ids, temperature, s, max_new_token, min_new_token,
                             return_hidden, manual_seed, context)

    @torch.no_grad()
    def _generate(self, emb, inputs_ids, temperature, s: Sampling, max_new_token, min_new_token,
                  return_hidden, manual_seed, context):
        from ChatTTS.model.gpt import GPT

        device = emb.device
        num_vq = inputs_ids.shape[2]
        length = inputs_ids.shape[1]
        step = self._step_fn(s)
        temp = temperature.to(device).float().view(-1, 1)  # (num_vq, 1): batch 1
        window = torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device)
        mask_eos = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        noise = ExpNoise(self.gpt.generator, manual_seed)

        hidden = self._prefill(emb)
        probs = process_logits(code_logits(self.model, hidden), window, temp, mask_eos[min_new_token > 0], s)
        nxt = draw(probs, noise(probs))
        eos = nxt.eq(s.eos).any()
        tokens, hiddens, n_out, advanced = [], [], 0, 0
        start = time.perf_counter()
        for i in range(max_new_token):
            tokens.append(nxt)
            if return_hidden:
                hiddens.append(hidden)
            if bool(eos) or (context is not None and context.get()):
                break
            n_out += 1
            if i + 1 == max_new_token:
                break
            hidden, nxt, window, eos = self._advance(step, nxt, length + i, window, temp,
                                                     mask_eos[i + 1 < min_new_token], noise(probs))
            advanced += 1
        if advanced:
            if device.type == "cuda":  # the last step's EOS flag may be unread
                torch.cuda.synchronize(device)
            self.last_steps = (advanced, time.perf_counter() - start)
        ids = torch.cat([inputs_ids[0], torch.cat(tokens).to(inputs_ids.dtype)])[None]
        hid = [torch.cat(hiddens)[:n_out]] if return_hidden else []
        return GPT.GenerationOutputs(ids=[ids[0].narrow(0, length, n_out)], attentions=[], hiddens=hid)

    def _advance(self, step, ids: torch.Tensor, pos: int, window, temp, mask_eos, noise):
        """Run the decode step for tokens ``ids`` (1, num_vq) at position ``pos``."""
        slots = self.model.slots
        if self.model.full_keys:
            # pos as its own tensor, not a view of keys: the layout run and tested on a GPU (a
            # view, as the CPU layout passes, would spare this copy; untested with CUDA graphs)
            out = step(self.model, ids, slots, window, temp, mask_eos, noise, slots[pos:pos + 1].clone())
        else:
            keys = slots[:pos + 1]
            torch._dynamo.maybe_mark_dynamic(keys, 0)  # one graph for every length
            out = step(self.model, ids, keys, window, temp, mask_eos, noise)
        if self.graphs:  # CUDA graphs reuse their output buffers
            out = tuple(t.clone() for t in out)
        return out

    @torch.no_grad()
    def forced_hidden(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """Hidden states this path computes over a given code sequence (teacher forcing): the
        prompt embeddings ``emb`` (1, L, H), then ``tokens`` (n, num_vq) one step at a time
        through the (compiled) step -> (n, H) fp32, row i being what predicts token i. None
        when the sequence does not fit the cache."""
        length, n = emb.shape[1], tokens.shape[0]
        if length + n > self.settings.cache_capacity:
            return None
        s = self.default_sampling()
        step = self._step_fn(s)
        num_vq, device = tokens.shape[1], emb.device
        window = torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device)
        temp, no_mask = torch.ones(num_vq, 1, device=device), torch.tensor(False, device=device)
        noise = torch.ones(num_vq, self.chat.config.gpt.num_audio_tokens, device=device)
        hiddens = [self._prefill(emb)]
        for i in range(n - 1):
            hiddens.append(self._advance(step, tokens[i:i + 1], length + i, window, temp, no_mask, noise)[0])
        return torch.cat(hiddens).float()


def _or_just_in_time(precompile: Callable[[], "Precompiled"], fallback: Callable) -> Callable:
    """``precompile()``, or ``fallback`` where ahead-of-time compilation fails."""
    try:
        return precompile()
    except Exception as exc:  # noqa: BLE001 - an experimental API (Inductor freezing is refused)
        log.warning("ahead-of-time compilation failed (%s: %s); compiling just in time",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return fallback


class Precompiled:
    """An ahead-of-time compiled function, and what runs instead where a call fails its guards
    (where a just-in-time one would recompile): a one-token prompt, for one, against the saved
    prompt pass traced for two or more. The guards are checked here, as the function would check
    them itself, but a failure costs no exception and no explanation of which guard failed."""

    def __init__(self, fn: Callable, fallback: Callable):
        self.fn, self.fallback = fn, fallback
        fn.disable_guard_check()

    def __call__(self, *args):
        if self.fn.guard_check(*args):
            return self.fn(*args)
        log.debug("these inputs fail the precompiled function's guards; running it just in time")
        return self.fallback(*args)

    def save(self, path: str | Path) -> None:
        self.fn.save_compiled_function(str(path))


def for_device(settings: CompileSettings, device: torch.device) -> CompileSettings:
    """The settings with mode "auto" made concrete: CUDA graphs on CUDA, Inductor's default
    elsewhere."""
    if settings.mode != "auto":
        return settings
    return dataclasses.replace(settings, mode="reduce-overhead" if device.type == "cuda" else "default")


def uses_cuda_graphs(settings: CompileSettings, device: torch.device) -> bool:
    from torch._inductor import list_mode_options

    return device.type == "cuda" and bool(list_mode_options(settings.mode).get("triton.cudagraphs"))


def compile_kwargs(settings: CompileSettings, cuda_graphs: bool = True) -> dict:
    """torch.compile's Inductor options: the recipe's mode (less CUDA graphs if not
    ``cuda_graphs``) and freezing, and no size asserts.

    Inductor's generated code asserts every input's sizes and strides in Python on each call
    (about 0.8 us each, 336 inputs in the int8 step: 0.3 ms); Dynamo's guards have checked the
    same before the graph runs."""
    from torch._inductor import list_mode_options

    mode = {k: v for k, v in list_mode_options(settings.mode).items() if cuda_graphs or k != "triton.cudagraphs"}
    return {"options": {**mode, "freezing": settings.freezing, "size_asserts": False}}


def enable_compiled_decoding(chat, settings: CompileSettings, compile_step: bool = True) -> CompiledGenerate:
    """Route ChatTTS's code generation through the static-cache path (compiled unless told not)."""
    if compile_step:
        skip_vec_isa_probe()
    gen = CompiledGenerate(chat, settings, compile_step=compile_step)
    chat.gpt.generate = gen
    return gen


def _aot(compile_fn: Callable, settings: CompileSettings, example: tuple):
    # Scoped: left on, the setting changes what later just-in-time compilations cache.
    with torch._dynamo.config.patch(enable_aot_compile=True), torch.no_grad():
        return compile_fn(settings).aot_compile((example, {}))


def skip_vec_isa_probe() -> None:
    """Inductor's first CPU compile (or load) in a process probes vector ISAs by building test
    libraries and importing each in a fresh Python: about 10 s here. The CPU flags answer its
    base check; the AVX-512 BF16 and VNNI checks it makes besides (can this compiler build with
    those flags: 5.2 s a process here, warm) are answered once per machine and remembered."""
    import torch._inductor.config

    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        torch._inductor.config.cpp.vec_isa_ok = True
        _remember_isa_checks()


ISA_CHECKS = "vec_isa_checks.json"


def _remember_isa_checks() -> None:
    """Make Inductor's ISA build checks answer from quantkit's cache (keyed by compiler, flags,
    torch version and test code), running each for real the first time."""
    from torch._inductor import cpu_vec_isa

    from quantkit.models import cache_dir

    check = cpu_vec_isa.VecISA.check_build
    if getattr(check, "remembered", False):
        return
    fingerprint = getattr(cpu_vec_isa, "_get_isa_dry_compile_fingerprint", None)
    if fingerprint is None:  # another torch: leave its probe alone
        return
    path = cache_dir() / ISA_CHECKS

    def check_build(isa, code: str) -> bool:
        # torch keys its own build the same way (the bf16 check extends _arch_flags first)
        key = hashlib.sha256(f"{fingerprint(isa._arch_flags)}\0{code}".encode()).hexdigest()
        try:
            answers = json.loads(path.read_text())
        except (OSError, ValueError):
            answers = {}
        if not isinstance(answers, dict):  # not ours: overwritten with real answers
            answers = {}
        if not isinstance(answers.get(key), bool):
            answers[key] = bool(check(isa, code))
            write_text(path, json.dumps(answers, indent=1))
        return answers[key]

    check_build.remembered = True
    cpu_vec_isa.VecISA.check_build = check_build
