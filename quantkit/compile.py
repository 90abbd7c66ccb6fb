"""ChatTTS's ``GPT.generate``, compiled: ``CompiledGenerate`` takes ChatTTS's call, runs
quantkit.generate's loop over a static KV cache with the decode step and prompt pass compiled
(one graph per batch bucket and cache size; the filled length is a symbolic size), and hands
back ChatTTS's outputs. ChatTTS's own loop grows its cache every step, so torch.compile would
recompile at every step. Saving and loading what was compiled: quantkit.compile_artifacts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from quantkit import chattts
from quantkit.generate import (Decoder, Request, advance, decode_step, decode_text_step, generate, prefill,
                               prefill_positions)
from quantkit.inductor import compile_kwargs, for_device, skip_vec_isa_probe, uses_cuda_graphs
from quantkit.recipes import CompileSettings
from quantkit.sampling import ExpNoise, Sampling
from quantkit.static_cache import MAX_CAPACITY

log = logging.getLogger(__name__)


def compile_decode_step(settings: CompileSettings, step: Callable = decode_step) -> Callable:
    return torch.compile(step, fullgraph=True, dynamic=False, **compile_kwargs(settings))


def compile_prefill(settings: CompileSettings) -> Callable:
    """The prompt pass, compiled: eagerly, its ~30 small operations per layer around the int8
    products cost more than the products. Never as CUDA graphs: one graph would be recorded per
    prompt length."""
    return torch.compile(prefill, fullgraph=True, dynamic=False, **compile_kwargs(settings, cuda_graphs=False))


class CompiledGenerate:
    """Drop-in for ChatTTS's ``GPT.generate`` (same arguments, same GenerationOutputs, streaming
    included) that decodes on the static-cache path (quantkit.generate): batches, text
    refinement, streaming and any length up to 8192 slots. What it does not cover goes to
    ChatTTS's own loop, with a warning naming the reason (once per reason)."""

    def __init__(self, chat, settings: CompileSettings, compile_step: bool = True):
        self.chat = chat
        self.fallback = chattts.installed_generate(chat)
        device = chattts.gpt_device(chat)
        self.settings = settings = for_device(settings, device)
        self.model = chattts.static_model(chat, settings.cache_capacity)
        # CUDA graphs replay a step recorded for one set of shapes: with them a step attends to a
        # power-of-two bucket of slots under a mask (quantkit.generate.advance); elsewhere it
        # reads only the filled slots.
        self.graphs = compile_step and uses_cuda_graphs(settings, device)
        self.model.set_full_keys(self.graphs)
        # Just-in-time compiled functions, and the ahead-of-time ones used first where they
        # exist (loaded from a variant, or compiled at first use on CPU).
        self.step = compile_decode_step(settings) if compile_step else decode_step
        self.text_step = compile_decode_step(settings, decode_text_step) if compile_step else decode_text_step
        self.prefill = compile_prefill(settings) if compile_step else prefill
        self.precompiled: dict[Sampling, Callable] = {}
        self.precompiled_prefill: Callable | None = None
        # On CPU, compiled ahead of time at first use: the functions that `apply --compile-cache`
        # and export save are then the ones that ran. CUDA keeps just-in-time compilation:
        # CUDA graphs are untested ahead of time here.
        self.ahead = compile_step and self.model.slots.device.type == "cpu"
        self._interned: dict[Sampling, Sampling] = {}
        self._warned: set[str] = set()
        # (decode steps, seconds) of the last call (None where it ran ChatTTS's loop): the steps
        # alone, without the prompt pass and ChatTTS's work around the loop, for the evaluator.
        self.last_steps: tuple[int, float] | None = None

    def _use_sampling(self, s: Sampling) -> None:
        # One Sampling object per value: the compiled step guards on model.sampling.
        self.model.sampling = self._interned.setdefault(s, s)

    def step_for(self, s: Sampling, text: bool = False):
        self._use_sampling(s)
        if text:
            return self.text_step
        if s not in self.precompiled and self.ahead:
            self.precompiled[s] = _or_just_in_time(lambda: self.precompile_step(s), self.step)
        return self.precompiled.get(s, self.step)

    def _prefill_fn(self):
        if self.precompiled_prefill is None and self.ahead:
            self.precompiled_prefill = _or_just_in_time(self.precompile_prefill, self.prefill)
        return self.precompiled_prefill or self.prefill

    def precompile_step(self, s: Sampling) -> "Precompiled":
        """The decode step for sampling ``s`` compiled ahead of time (raises where that fails)."""
        return Precompiled(_aot(compile_decode_step, self.settings, self.example_inputs(s)), self.step)

    def precompile_prefill(self) -> "Precompiled":
        """The prompt pass compiled ahead of time (raises where that fails)."""
        return Precompiled(_aot(compile_prefill, self.settings, self.example_prompt()), self.prefill)

    def example_inputs(self, s: Sampling) -> tuple:
        """Arguments for compiling the decode step ahead of time: the cache's current rows."""
        model, rows = self.model, self.model.rows
        num_vq, device = len(model.emb_code), model.slots.device
        self._use_sampling(s)
        keys = model.slots[:2]
        torch._dynamo.mark_dynamic(keys, 0)
        return (model, torch.zeros(rows, num_vq, dtype=torch.long, device=device), keys,
                torch.ones(rows, 1, dtype=torch.long, device=device),
                torch.zeros(rows, dtype=torch.long, device=device),
                torch.full((rows * num_vq, s.past_window), -1, dtype=torch.long, device=device),
                torch.ones(rows * num_vq, 1, device=device), torch.tensor(False, device=device),
                torch.ones(rows * num_vq, chattts.num_audio_tokens(self.chat), device=device))

    def example_prompt(self) -> tuple:
        """Arguments for compiling the prompt pass ahead of time (any length from 2)."""
        model, rows = self.model, self.model.rows
        with torch.inference_mode():
            emb = torch.zeros(rows, 2, model.llama.config.hidden_size, device=model.slots.device)
        prompt = model.slots[:2]
        pad = torch.zeros(rows, dtype=torch.long, device=prompt.device)
        positions = prefill_positions(pad, 2)
        for t, dim in ((emb, 1), (prompt, 0), (positions, 1)):
            torch._dynamo.mark_dynamic(t, dim)
        return model, emb, prompt, positions, pad

    def default_sampling(self) -> Sampling:
        """What ChatTTS's default InferCodeParams give (the harness uses them)."""
        return chattts.default_sampling(self.chat)

    def __call__(self, emb, inputs_ids, temperature, eos_token, attention_mask=None, max_new_token=2048,
                 min_new_token=0, logits_processors=(), infer_text=False, return_attn=False,
                 return_hidden=False, stream=False, show_tqdm=True, ensure_non_empty=True,
                 stream_batch=24, manual_seed=None, context=None):
        self.last_steps = None
        s = chattts.sampling_from(logits_processors, int(eos_token))
        pad = left_padding(attention_mask, inputs_ids.shape[:2], inputs_ids.device)
        reason = self._not_covered(s, infer_text, return_attn, pad, inputs_ids, max_new_token, stream_batch)
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("compiled decoding does not cover %s: this call runs ChatTTS's own loop", reason)
            kwargs = dict(attention_mask=attention_mask, max_new_token=max_new_token,
                          min_new_token=min_new_token, logits_processors=logits_processors,
                          infer_text=infer_text, return_attn=return_attn, return_hidden=return_hidden,
                          stream=stream, show_tqdm=show_tqdm, ensure_non_empty=ensure_non_empty,
                          stream_batch=stream_batch, manual_seed=manual_seed)
            if context is not None:
                kwargs["context"] = context
            yield from self.fallback(emb, inputs_ids, temperature, eos_token, **kwargs)
            return
        rows = inputs_ids.shape[0]
        if not emb.is_inference():  # as ChatTTS's embeddings are: the saved prompt pass guards on it
            with torch.inference_mode():
                emb = emb.clone()
        req = Request(emb=emb, pad=pad.to(emb.device), max_new=max_new_token, min_new=min_new_token,
                      temperature=temperature.to(emb.device).float().view(1, -1).expand(rows, -1).reshape(-1, 1),
                      text=infer_text, stream_every=stream_batch if stream else None,
                      return_hidden=return_hidden, redo_empty=ensure_non_empty and manual_seed is None,
                      stop=context.get if context is not None else (lambda: False))
        dec = self._decoder(s, infer_text, manual_seed)
        with torch.no_grad():
            for progress in generate(dec, req, s):
                if progress.final and dec.steps:
                    self.last_steps = (dec.steps, dec.step_seconds)
                yield chattts.generation_outputs(progress, inputs_ids.dtype, infer_text)

    def _not_covered(self, s, infer_text, return_attn, pad, inputs_ids, max_new_token, stream_batch) -> str | None:
        """Why this call cannot run on the static-cache path, or None."""
        if return_attn:
            return "return_attn (attention weights)"
        if s is None:
            return "a logits processor it does not know"
        if infer_text and s.penalty is not None:
            return "text refinement with a repetition penalty"
        if pad is None:
            return "an attention mask that is not left padding"
        if inputs_ids.shape[1] + max_new_token > MAX_CAPACITY:
            return f"prompt + max_new_token beyond {MAX_CAPACITY} tokens"
        if stream_batch < 1:
            return "stream_batch below 1"
        return None

    def _decoder(self, s: Sampling, text: bool, manual_seed: int | None) -> Decoder:
        step = self.step_for(s, text)
        return Decoder(model=self.model, prefill=self._prefill_fn(), step=step,
                       noise=ExpNoise(chattts.generator(self.chat), manual_seed, self.model.slots.device),
                       graphs=self.graphs)

    @torch.no_grad()
    def forced_hidden(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """Hidden states this path computes over a given code sequence (teacher forcing): the
        prompt embeddings ``emb`` (1, L, H), then ``tokens`` (n, num_vq) one step at a time
        through the (compiled) step -> (n, H) fp32, row i being what predicts token i. None
        when the sequence does not fit the largest cache."""
        length, n = emb.shape[1], tokens.shape[0]
        if length + n > MAX_CAPACITY:
            return None
        s = self.default_sampling()
        dec = self._decoder(s, False, 0)
        if not emb.is_inference():
            with torch.inference_mode():
                emb = emb.clone()
        num_vq, device = tokens.shape[1], emb.device
        self.model.reserve(1, length + 1, fresh=True)
        pad = torch.zeros(1, dtype=torch.long, device=device)
        window = torch.full((num_vq, s.past_window), -1, dtype=torch.long, device=device)
        temp, no_mask = torch.ones(num_vq, 1, device=device), torch.tensor(False, device=device)
        noise = torch.ones(num_vq, chattts.num_audio_tokens(self.chat), device=device)
        prompt, positions = self.model.slots[:length], prefill_positions(pad, length)
        for t, dim in ((prompt, 0), (emb, 1), (positions, 1)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        hiddens = [dec.prefill(self.model, emb, prompt, positions, pad)]
        for i in range(n - 1):
            hiddens.append(advance(dec, tokens[i:i + 1], length + i, pad, window, temp, no_mask, noise)[0])
        return torch.cat(hiddens).float()


def left_padding(mask: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor | None:
    """Each row's count of leading zeros in an attention mask (B, L) that is left padding, else
    None; zeros where there is no mask."""
    if mask is None:
        return torch.zeros(shape[0], dtype=torch.long, device=device)
    valid = mask.bool()
    pad = (~valid).sum(1)
    expected = torch.arange(valid.shape[1], device=valid.device)[None] >= pad[:, None]
    return pad.long() if bool(torch.equal(valid, expected)) else None


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


def enable_compiled_decoding(chat, settings: CompileSettings, compile_step: bool = True) -> CompiledGenerate:
    """Route ChatTTS's code generation through the static-cache path (compiled unless told not)."""
    if compile_step:
        skip_vec_isa_probe()
    gen = CompiledGenerate(chat, settings, compile_step=compile_step)
    chattts.install_generate(chat, gen)
    return gen


def _aot(compile_fn: Callable, settings: CompileSettings, example: tuple):
    # Scoped: left on, the setting changes what later just-in-time compilations cache.
    with torch._dynamo.config.patch(enable_aot_compile=True), torch.no_grad():
        return compile_fn(settings).aot_compile((example, {}))


