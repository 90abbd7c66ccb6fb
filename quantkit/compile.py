"""ChatTTS's ``GPT.generate``, compiled: ``CompiledGenerate`` takes ChatTTS's call, runs
quantkit.generate's loop over a static KV cache with the functions of
quantkit.compile_artifacts (one graph per batch bucket and cache size; the filled length is a
symbolic size), and hands back ChatTTS's outputs. ChatTTS's own loop grows its cache every step,
so torch.compile would recompile at every step.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import torch

from quantkit import chattts
from quantkit.compile_artifacts import CompiledFunctions
from quantkit.errors import QuantkitError
from quantkit.generate import Decoder, Request, generate, teacher_force
from quantkit.inductor import for_device, keep_cuda_guard_alive, skip_vec_isa_probe, uses_cuda_graphs
from quantkit.precision import DTYPES
from quantkit.recipes import CompileSettings
from quantkit.sampling import ExpNoise, Sampling
from quantkit.static_cache import MAX_CAPACITY

if TYPE_CHECKING:
    from ChatTTS import Chat

log = logging.getLogger(__name__)


class CompiledGenerate:
    """Drop-in for ChatTTS's ``GPT.generate`` (same arguments, same GenerationOutputs, streaming
    included) that decodes on the static-cache path (quantkit.generate): batches, text
    refinement, streaming and any length up to MAX_CAPACITY slots. What it does not cover goes
    to ChatTTS's own loop, with a warning naming the reason (once per reason)."""

    def __init__(self, chat: Chat, settings: CompileSettings, compile_step: bool = True):
        self.fallback = chattts.installed_generate(chat)
        self.generator = chattts.generator(chat)
        device = chattts.gpt_device(chat)
        settings = for_device(settings, device)
        cache_dtype = DTYPES.get(settings.kv_cache)  # "model": None, the model's own
        self.model = chattts.static_model(chat, settings.cache_capacity, cache_dtype)
        # CUDA graphs replay a step recorded for one set of shapes: with them a step attends to a
        # power-of-two bucket of slots under a mask; elsewhere it reads only the filled slots.
        self.graphs = compile_step and uses_cuda_graphs(settings, device)
        self.model.set_full_keys(self.graphs)
        self.default_sampling = chattts.default_sampling(chat)
        self.functions = CompiledFunctions(self.model, settings, self.default_sampling, compile_step,
                                           text_default=chattts.default_text_sampling(chat))
        self._warned: set[str] = set()
        self._cache_free = threading.Lock()  # one call at a time decodes into the one KV cache
        # (decode steps, seconds) of the last call (None where it ran ChatTTS's loop): the steps
        # alone, without the prompt pass and ChatTTS's work around the loop, for the evaluator.
        self.last_steps: tuple[int, float] | None = None

    def __call__(self, emb, inputs_ids, temperature, eos_token, attention_mask=None, max_new_token=2048,
                 min_new_token=0, logits_processors=(), infer_text=False, return_attn=False,
                 return_hidden=False, stream=False, show_tqdm=True, ensure_non_empty=True,
                 stream_batch=24, manual_seed=None, context=None):
        self.last_steps = None
        s = chattts.sampling_from(logits_processors, int(eos_token))
        pad = left_padding(attention_mask, inputs_ids.shape[:2], inputs_ids.device)
        reason = _not_covered(s, infer_text, return_attn, pad, inputs_ids.shape[1] + max_new_token, stream_batch)
        if reason is None and not self._cache_free.acquire(blocking=False):
            reason = "a call while another decodes into this Chat's KV cache (threads, or streams read in turn)"
        if reason is not None:
            self._warn(reason)
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
        try:  # released when the call ends, fails, or its stream is closed or dropped
            # a copy, not a stride-0 view: the steps compiled ahead of time guard on their inputs' strides
            temperature = temperature.to(emb.device).float().view(1, -1).expand(rows, -1).reshape(-1, 1).contiguous()
            req = Request(emb=emb, pad=pad.to(emb.device), max_new=max_new_token, min_new=min_new_token,
                          temperature=temperature,
                          text=infer_text, stream_every=stream_batch if stream else None,
                          return_hidden=return_hidden, redo_empty=ensure_non_empty and manual_seed is None,
                          stop=context.get if context is not None else (lambda: False))
            dec = self.decoder(s, infer_text, manual_seed)
            with torch.no_grad():
                for progress in generate(dec, req, s):
                    if progress.final and dec.steps:
                        self.last_steps = (dec.steps, dec.step_seconds)
                    yield chattts.generation_outputs(progress, inputs_ids.dtype, infer_text)
        finally:
            self._cache_free.release()

    def _warn(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("compiled decoding does not cover %s: this call runs ChatTTS's own loop", reason)

    def decoder(self, s: Sampling, text: bool = False, manual_seed: int | None = None) -> Decoder:
        """What quantkit.generate runs for a call with sampling ``s``."""
        f = self.functions
        return Decoder(model=self.model, prefill=f.prefill_fn(), step=f.step_for(s, text),
                       noise=ExpNoise(self.generator, manual_seed, self.model.slots.device), graphs=self.graphs)

    @torch.no_grad()
    def forced_hidden(self, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """quantkit.generate.teacher_force on this path, with ChatTTS's default sampling: the
        hidden states (n, H) over prompt embeddings ``emb`` (1, L, H) then code ``tokens``
        (n, num_vq); None when they do not fit the largest cache."""
        if emb.shape[1] + tokens.shape[0] > MAX_CAPACITY:
            return None
        if not self._cache_free.acquire(blocking=False):
            raise QuantkitError("teacher forcing while a call decodes into this Chat's KV cache: "
                                "finish or close that call first")
        try:
            s = self.default_sampling
            return teacher_force(self.decoder(s, manual_seed=0), s, emb, tokens)
        finally:
            self._cache_free.release()


def _not_covered(s: Sampling | None, infer_text: bool, return_attn: bool, pad: torch.Tensor | None,
                 length: int, stream_batch: int) -> str | None:
    """Why a call cannot run on the static-cache path, or None."""
    if return_attn:
        return "return_attn (attention weights)"
    if s is None:
        return "a logits processor it does not know"
    if infer_text and s.penalty is not None:
        return "text refinement with a repetition penalty"
    if pad is None:
        return "an attention mask that is not left padding"
    if length > MAX_CAPACITY:
        return f"prompt + max_new_token beyond {MAX_CAPACITY} tokens"
    if stream_batch < 1:
        return "stream_batch below 1"
    return None


def left_padding(mask: torch.Tensor | None, shape: tuple[int, int], device: torch.device | str) -> torch.Tensor | None:
    """Each row's count of leading zeros in an attention mask (B, L) that is left padding, else
    None; zeros where there is no mask."""
    if mask is None:
        return torch.zeros(shape[0], dtype=torch.long, device=device)
    valid = mask.bool()
    pad = (~valid).sum(1)
    expected = torch.arange(valid.shape[1], device=valid.device)[None] >= pad[:, None]
    return pad.long() if bool(torch.equal(valid, expected)) else None


def compiled_decoding(chat: Chat) -> CompiledGenerate | None:
    """The CompiledGenerate ``chat`` decodes with, or None where it runs ChatTTS's own loop."""
    gen = chattts.installed_generate(chat)
    return gen if isinstance(gen, CompiledGenerate) else None


def last_decode_steps(chat: Chat) -> tuple[int, float] | None:
    """(decode steps, seconds) of ``chat``'s last call, the steps alone (no prompt pass), where
    compiled decoding ran it; None where ChatTTS's own loop did."""
    gen = compiled_decoding(chat)
    return gen.last_steps if gen is not None else None


def enable_compiled_decoding(chat: Chat, settings: CompileSettings, compile_step: bool = True) -> CompiledGenerate:
    """Route ChatTTS's code generation through the static-cache path (compiled unless told not),
    and bound the decoder's work per streamed hand-over."""
    if compile_step:
        skip_vec_isa_probe()
        keep_cuda_guard_alive()
    gen = CompiledGenerate(chat, settings, compile_step=compile_step)
    chattts.install_generate(chat, gen)
    chattts.install_chunked_stream_decode(chat)
    return gen
