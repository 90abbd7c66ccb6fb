"""Timing the calls users make, through ChatTTS's own ``Chat.infer``: a long utterance, batches,
text refinement, and streaming's time to the first chunk. Fixed lengths (min = max new tokens)
make every recipe do the same work; each shape is timed warm (after one call of the same shape,
which compiles what a compiled recipe needs for it), with its speaker drawn before the clock
starts, as a user draws one once. Batches are the median of a few calls, the others one call:
a long or streamed call of a slow recipe takes a minute."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from quantkit.compile import last_decode_steps
from quantkit.synth import SAMPLE_RATE, SAMPLES_PER_STEP, fixed_speaker

if TYPE_CHECKING:
    import numpy as np
    from ChatTTS import Chat


@dataclass
class ShapeSettings:
    long_steps: int = 1100  # beyond a 1024-slot cache, as ChatTTS's defaults allow
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    batch_steps: int = 64
    batch_runs: int = 3  # warm calls a batch size, in rounds over the sizes: their median
    refine_texts: int = 4
    refine_steps: int = 32
    stream_steps: int = 96
    stream_batch: int = 24


@dataclass
class CallShapes:
    long: dict[str, float] = field(default_factory=dict)
    batches: list[dict[str, float]] = field(default_factory=list)
    refine: dict[str, float] = field(default_factory=dict)
    stream: dict[str, float] = field(default_factory=dict)


def audio_seconds(steps: int) -> float:
    return steps * SAMPLES_PER_STEP / SAMPLE_RATE


def _code(chat: Chat, seed: int, steps: int, speaker: str | None = None, **extra):
    spk = speaker if speaker is not None else fixed_speaker(chat, seed)  # drawing one takes ~40 ms
    return chat.InferCodeParams(spk_emb=spk, manual_seed=seed, min_new_token=steps, max_new_token=steps,
                                show_tqdm=False, **extra)


def _infer(chat: Chat, texts: list[str], code, refine=None, stream: bool = False):
    kwargs = dict(skip_refine_text=refine is None, params_infer_code=code, stream=stream,
                  do_text_normalization=False, split_text=False)
    if refine is not None:
        kwargs["params_refine_text"] = refine
    return chat.infer(texts, **kwargs)


def _refine(chat: Chat, seed: int, steps: int):
    return chat.RefineTextParams(manual_seed=seed, min_new_token=steps, max_new_token=steps, show_tqdm=False)


def infer_fixed(chat: Chat, texts: list[str], steps: int, seed: int = 0, speaker: str | None = None,
                refine_steps: int | None = None) -> list[np.ndarray]:
    """``Chat.infer`` on ``texts`` with exactly ``steps`` code steps a text (equal work whatever
    the weights), as ``speaker`` (default: synth.fixed_speaker's for ``seed``, drawn for this
    call), refinement skipped or of exactly ``refine_steps`` steps -> ChatTTS's waveforms."""
    refine = None if refine_steps is None else _refine(chat, seed, refine_steps)
    return _infer(chat, texts, _code(chat, seed, steps, speaker), refine)


def _timed(fn) -> float:
    fn()  # warm: what this shape compiles, it compiles here
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def measure_call_shapes(chat: Chat, texts: list[str], s: ShapeSettings, seed: int = 0) -> dict[str, Any]:
    """The call shapes, timed warm -> results.json's ``call_shapes``."""
    pick = [texts[i % len(texts)] for i in range(max(max(s.batch_sizes), s.refine_texts))]
    out, spk = CallShapes(), fixed_speaker(chat, seed)
    seconds = _timed(lambda: infer_fixed(chat, pick[:1], s.long_steps, seed, spk))
    out.long = {"steps": s.long_steps, "s": seconds, "rtf": seconds / audio_seconds(s.long_steps)}
    out.batches = measure_batches(chat, pick, s, seed, spk)
    refine = _refine(chat, seed, s.refine_steps)
    seconds = _timed(lambda: _infer(chat, pick[:s.refine_texts], _code(chat, seed, s.batch_steps, spk), refine))
    out.refine = {"texts": s.refine_texts, "refine_steps": s.refine_steps, "steps": s.batch_steps, "s": seconds}
    out.stream = _stream(chat, pick[0], s, seed, spk)
    return asdict(out)


def measure_batches(chat: Chat, texts: list[str], s: ShapeSettings, seed: int, speaker: str) -> list[dict[str, Any]]:
    """Batches of the first ``texts`` at ``s.batch_sizes``: each size warm, then ``s.batch_runs``
    rounds of one call per size, medians. A ratio between sizes then compares calls made moments
    apart, not in different phases of a noisy machine."""
    calls = {b: (lambda b=b: infer_fixed(chat, texts[:b], s.batch_steps, seed, speaker)) for b in s.batch_sizes}
    for call in calls.values():
        call()  # what each batch bucket compiles, it compiles here
    seconds: dict[int, list[float]] = {b: [] for b in calls}
    rates: dict[int, list[float | None]] = {b: [] for b in calls}
    for _ in range(s.batch_runs):
        for b, call in calls.items():
            t0 = time.perf_counter()
            call()
            seconds[b].append(time.perf_counter() - t0)
            rates[b].append(_row_steps_per_s(chat, b))
    return [_batch_record(b, s.batch_steps, seconds[b], rates[b]) for b in calls]


def _batch_record(rows: int, steps: int, seconds: list[float], rates: list[float | None]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {"batch": rows, "steps": steps, "s": median, "runs_s": seconds,
            "audio_s_per_s": rows * audio_seconds(steps) / median,
            "row_steps_per_s": None if None in rates else statistics.median(rates)}


def _row_steps_per_s(chat: Chat, rows: int) -> float | None:
    """The last call's decode steps alone (no prompt pass, decoder or vocoder) in rows times steps
    a second: what a batch gains where a step reads its weights once for all rows. None where
    ChatTTS's own loop ran (not timed apart)."""
    timed = last_decode_steps(chat)
    return rows * timed[0] / timed[1] if timed else None


def _stream(chat: Chat, text: str, s: ShapeSettings, seed: int, speaker: str) -> dict[str, float]:
    """Time to the first streamed chunk (no hand-over skipped) against the whole call unstreamed."""
    code = _code(chat, seed, s.stream_steps, speaker, stream_batch=s.stream_batch, pass_first_n_batches=0)
    whole = _timed(lambda: _infer(chat, [text], code))
    first = []
    for _ in range(2):  # the first pass warms up
        t0 = time.perf_counter()
        chunks = _infer(chat, [text], code, stream=True)
        next(iter(chunks))
        first.append(time.perf_counter() - t0)
        for _chunk in chunks:  # the rest of the call, so that the next starts clean
            pass
    return {"steps": s.stream_steps, "stream_batch": s.stream_batch, "first_chunk_s": first[-1],
            "whole_s": whole, "ratio": first[-1] / whole}
