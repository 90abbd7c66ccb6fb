"""Decoding over a static KV cache in call order, as gpt-fast's generate.py: ``prefill``,
``decode_step`` (and ``decode_text_step``, text refinement's), and the ``generate`` loop.

Plain tensors and modules only: the model is a quantkit.static_cache.StaticCacheGPT, the request
a ``Request``, the sampling constants a ``Sampling`` passed to each step; quantkit.compile adapts
ChatTTS's ``GPT.generate`` call to it. A batch decodes its rows together (left-padded prompts, as
ChatTTS pads them; each row stops at its own EOS). The step functions are free functions of the
model so that they can be compiled, also ahead of time (quantkit.compile_artifacts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from quantkit import int8_gemv
from quantkit.sampling import Sampling, draw, process_logits

if TYPE_CHECKING:
    from quantkit.static_cache import StaticCacheGPT


def prefill(model: StaticCacheGPT, emb: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
            pad: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings (B, L, H) into cache ``slots`` (L,), at rotary ``positions`` (B, L), rows
    left-padded by ``pad`` (B,) -> the last hidden state of each row (B, H)."""
    return model(emb, slots, positions, slots, pad)[:, -1]


def decode_step(model: StaticCacheGPT, ids: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                pad: torch.Tensor, window: torch.Tensor, temperature: torch.Tensor,
                mask_eos: torch.Tensor, noise: torch.Tensor, s: Sampling,
                slot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One audio-code step for every row: the last tokens ``ids`` (B, num_vq), fed into cache
    slot ``slot`` (default ``keys[-1:]``) at rotary ``positions`` (B, 1), attending to the slots
    ``keys``, sampled with the constants ``s`` -> (hidden (B, H), next tokens (B, num_vq), the
    penalty window with ``ids`` appended, whether each row's next tokens hold EOS (B,))."""
    rows = ids.shape[0]
    window = torch.cat([window[:, 1:], ids.reshape(-1, 1)], 1)
    emb = torch.stack([emb(ids[:, i]) for i, emb in enumerate(model.emb_code)], 2).sum(2)
    hidden = model(emb[:, None].float(), keys[-1:] if slot is None else slot, positions, keys, pad)[:, -1]
    probs = process_logits(code_logits(model, hidden), window, temperature, mask_eos, s, sort_of(model))
    nxt = draw(probs, noise).view(rows, -1)
    return hidden, nxt, window, nxt.eq(s.eos).any(1)


def decode_text_step(model: StaticCacheGPT, ids: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                     pad: torch.Tensor, window: torch.Tensor, temperature: torch.Tensor,
                     mask_eos: torch.Tensor, noise: torch.Tensor, s: Sampling,
                     slot: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """decode_step for text refinement: text tokens ``ids`` (B, 1) through the text embedding and
    the text head."""
    rows = ids.shape[0]
    window = torch.cat([window[:, 1:], ids.reshape(-1, 1)], 1)
    emb = model.emb_text(ids[:, 0])
    hidden = model(emb[:, None].float(), keys[-1:] if slot is None else slot, positions, keys, pad)[:, -1]
    probs = process_logits(text_logits(model, hidden), window, temperature, mask_eos, s, sort_of(model))
    nxt = draw(probs, noise).view(rows, 1)
    return hidden, nxt, window, nxt.eq(s.eos).any(1)


def sort_of(model: StaticCacheGPT) -> Callable:
    """Top-p's sort: a batch's rows shared between the threads where the model runs on
    quantkit's CPU kernels (the same result as torch.sort)."""
    return int8_gemv.sort_rows if model.kernels else torch.sort


def code_logits(model: StaticCacheGPT, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden (B, H) -> the code heads' logits (B * num_vq, vocab), fp32, rows in ChatTTS's order
    (row b * num_vq + q is row b's codebook q)."""
    return torch.stack(model.heads_code(hidden), 1).float().flatten(0, 1)


def text_logits(model: StaticCacheGPT, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden (B, H) -> the text head's logits (B, vocab), fp32."""
    return model.head_text(hidden).float()


@dataclass
class Request:
    """One generate call, as tensors and numbers."""
    emb: torch.Tensor  # (B, L, H) prompt embeddings
    pad: torch.Tensor  # (B,) slots of left padding before each row's prompt
    temperature: torch.Tensor  # (B * width, 1)
    max_new: int
    min_new: int = 0
    text: bool = False  # text refinement: one token a row, from the text head
    stream_every: int | None = None  # hand over the progress every this many steps
    return_hidden: bool = False
    redo_empty: bool = False  # ChatTTS's ensure_non_empty, unseeded: redo a call whose first token ends a row
    stop: Callable[[], bool] = field(default=lambda: False)


@dataclass
class Progress:
    tokens: torch.Tensor  # (B, steps, width) tokens generated so far
    hiddens: torch.Tensor | None  # (B, steps, H), where asked for
    ends: torch.Tensor  # (B,) tokens before each row's EOS (ChatTTS's end_idx)
    final: bool


@dataclass
class Decoder:
    """What ``generate`` calls: the model and the (compiled or eager) functions, and the noise
    source (``noise(shape)`` -> Exp(1) noise, as torch.multinomial would draw it)."""
    model: torch.nn.Module
    prefill: Callable
    step: Callable
    noise: Callable[[tuple[int, ...]], torch.Tensor]
    graphs: bool = False  # CUDA graphs: the step's outputs are buffers it reuses
    step_seconds: float = 0.0  # the decode steps alone (no prompt pass), of the last call
    steps: int = 0


def bucket(rows: int) -> int:
    """Rows a batch runs as: a power of two, so that few batch sizes are compiled."""
    return 1 << max(rows - 1, 0).bit_length()


def generate(dec: Decoder, req: Request, s: Sampling) -> Iterator[Progress]:
    """Decode ``req`` with sampling ``s``: yields the progress every ``req.stream_every`` steps
    in which a row was still going (as ChatTTS's loop hands over its stream) and once at the
    end."""
    while True:
        redo = yield from _generate(dec, req, s)
        if not redo:
            return


@dataclass
class _Rows:
    """A call's per-row tensors, padded to its batch bucket."""
    pad: torch.Tensor  # (rows,)
    temp: torch.Tensor  # (rows * width, 1)
    window: torch.Tensor  # (rows * width, past_window): the repetition penalty's last tokens
    real: int  # rows that are the caller's
    width: int  # tokens a row per step: num_vq, or 1 for text


def _generate(dec: Decoder, req: Request, s: Sampling) -> Iterator[Progress]:
    """One attempt at ``req`` -> True where ChatTTS's ensure_non_empty asks for another."""
    device, length = req.emb.device, req.emb.shape[1]
    r = _rows_of(req, len(dec.model.emb_code), s)
    mask_eos = (torch.tensor(False, device=device), torch.tensor(True, device=device))
    hidden, nxt, eos, shape = _first(dec, req, s, r, mask_eos[req.min_new > 0])
    out = _Output(r.real, device, req.return_hidden)
    dec.steps, start = 0, time.perf_counter()
    for i in range(req.max_new):
        out.add(nxt, hidden, eos)
        if i == 0 and req.redo_empty and bool(out.finish.any()):
            return True
        if req.stream_every and out.handed > 0 and out.handed % req.stream_every == 0:
            yield out.progress(final=False)
        if bool(out.finish.all()) or req.stop() or i + 1 == req.max_new:
            break
        hidden, nxt, r.window, eos = advance(dec, s, nxt, length + i, r.pad, r.window, r.temp,
                                              mask_eos[i + 1 < req.min_new], _noise(dec, shape, r.real * r.width))
        dec.steps += 1
    if dec.steps and device.type == "cuda":  # the last step's EOS flags may be unread
        torch.cuda.synchronize(device)
    dec.step_seconds = time.perf_counter() - start
    yield out.progress(final=True)
    return False


def _first(dec: Decoder, req: Request, s: Sampling, r: _Rows, mask_eos: torch.Tensor):
    """The prompt pass and the first tokens -> (hidden, tokens, EOS flags, the noise's shape)."""
    model = dec.model
    model.reserve(r.pad.shape[0], req.emb.shape[1] + 1, fresh=True)
    hidden = dec.prefill(*prompt_inputs(model, as_inference(_rows(req.emb, r.pad.shape[0])), r.pad))
    logits = text_logits(model, hidden) if req.text else code_logits(model, hidden)
    probs = process_logits(logits, r.window, r.temp, mask_eos, s, sort_of(model))
    nxt = draw(probs, _noise(dec, probs.shape, r.real * r.width)).view(-1, r.width)
    return hidden, nxt, nxt.eq(s.eos).any(1), probs.shape


class _Output:
    """A call's tokens (and hidden states) so far, for its caller's rows, and the steps handed
    over: ChatTTS counts only steps in which a row went on."""

    def __init__(self, rows: int, device: torch.device, keep_hidden: bool):
        self.rows, self.keep_hidden = rows, keep_hidden
        self.tokens: list[torch.Tensor] = []
        self.hiddens: list[torch.Tensor] = []
        self.finish = torch.zeros(rows, dtype=torch.bool, device=device)  # rows that met EOS
        self.ends = torch.zeros(rows, dtype=torch.long, device=device)  # ChatTTS's end_idx
        self.handed = 0

    def add(self, nxt: torch.Tensor, hidden: torch.Tensor, eos: torch.Tensor) -> None:
        self.tokens.append(nxt[:self.rows])
        if self.keep_hidden:
            self.hiddens.append(hidden[:self.rows])
        self.finish |= eos[:self.rows]
        self.ends += ~self.finish
        self.handed += int((~self.finish).any())

    def progress(self, final: bool) -> Progress:
        hiddens = torch.stack(self.hiddens, 1) if self.hiddens else None
        return Progress(tokens=torch.stack(self.tokens, 1), hiddens=hiddens, ends=self.ends.clone(), final=final)


def advance(dec: Decoder, s: Sampling, ids: torch.Tensor, slot: int, pad: torch.Tensor, window: torch.Tensor,
            temp: torch.Tensor, mask_eos: torch.Tensor, noise: torch.Tensor) -> tuple:
    """Run the decode step for tokens ``ids`` (rows, width) fed into cache slot ``slot``."""
    model = dec.model
    model.reserve(ids.shape[0], slot + 1)
    positions = (slot - pad).view(-1, 1)
    if model.full_keys:
        # for CUDA graphs: the slots of a power-of-two bucket attended under a mask (one shape, so
        # one graph, per bucket; a short call does not read a long cache); the slot as its own
        # tensor, not a view of the keys: the layout run and tested on a GPU
        keys = model.slots[:min(model.capacity, max(256, 1 << slot.bit_length()))]
        out = dec.step(model, ids, keys, positions, pad, window, temp, mask_eos, noise, s,
                       model.slots[slot:slot + 1].clone())
    else:
        keys = model.slots[:slot + 1]
        torch._dynamo.maybe_mark_dynamic(keys, 0)  # one graph for every length
        out = dec.step(model, ids, keys, positions, pad, window, temp, mask_eos, noise, s)
    return tuple(t.clone() for t in out) if dec.graphs else out  # CUDA graphs reuse their outputs


def teacher_force(dec: Decoder, s: Sampling, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states over a given code sequence: the prompt embeddings ``emb`` (1, L, H), then
    ``tokens`` (n, num_vq) fed one step at a time through ``dec.step`` -> (n, H) fp32, row i being
    what predicts token i."""
    model, device, length = dec.model, emb.device, emb.shape[1]
    model.reserve(1, length + 1, fresh=True)
    pad = torch.zeros(1, dtype=torch.long, device=device)
    window = torch.full((tokens.shape[1], s.past_window), -1, dtype=torch.long, device=device)
    temp, no_mask = torch.ones(tokens.shape[1], 1, device=device), torch.tensor(False, device=device)
    noise = torch.ones(tokens.shape[1], model.code_vocab, device=device)
    hiddens = [dec.prefill(*prompt_inputs(model, as_inference(emb), pad))]
    for i in range(tokens.shape[0] - 1):
        hiddens.append(advance(dec, s, tokens[i:i + 1], length + i, pad, window, temp, no_mask, noise)[0])
    return torch.cat(hiddens).float()


def prompt_inputs(model: StaticCacheGPT, emb: torch.Tensor, pad: torch.Tensor,
                  mark: Callable = torch._dynamo.maybe_mark_dynamic) -> tuple:
    """``prefill``'s arguments for prompt embeddings ``emb`` (B, L, H) left-padded by ``pad`` (B,),
    the prompt length marked dynamic (one graph for every length)."""
    length = emb.shape[1]
    prompt, positions = model.slots[:length], prefill_positions(pad, length)
    for t, dim in ((prompt, 0), (emb, 1), (positions, 1)):
        mark(t, dim)
    return model, emb, prompt, positions, pad


def prefill_positions(pad: torch.Tensor, length: int) -> torch.Tensor:
    """Rotary positions of a left-padded prompt, as ChatTTS computes them from its attention
    mask (cumsum - 1; padding at position 1)."""
    slots = torch.arange(length, device=pad.device)[None]
    return torch.where(slots >= pad[:, None], slots - pad[:, None], 1)


def as_inference(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an inference tensor, as ChatTTS's embeddings are: the saved prompt pass guards on it."""
    if t.is_inference():
        return t
    with torch.inference_mode():
        return t.clone()


def _rows_of(req: Request, num_vq: int, s: Sampling) -> _Rows:
    real = req.emb.shape[0]
    width, rows = 1 if req.text else num_vq, bucket(real)
    window = torch.full((rows * width, s.past_window), -1, dtype=torch.long, device=req.emb.device)
    return _Rows(pad=_rows(req.pad, rows), temp=_rows(req.temperature.view(real, width), rows).view(-1, 1),
                 window=window, real=real, width=width)


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with rows of zeros added up to ``rows`` (a batch bucket's unused rows)."""
    extra = rows - t.shape[0]
    return t if extra == 0 else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])


def _noise(dec: Decoder, shape: tuple[int, ...], real: int) -> torch.Tensor:
    """Noise for the real rows as ChatTTS's call draws it, ones for a bucket's unused rows."""
    noise = dec.noise((real, shape[1]))
    return noise if real == shape[0] else torch.cat([noise, noise.new_ones(shape[0] - real, shape[1])])
