"""Deterministic synthesis around ChatTTS: seeded sampling, a fixed speaker, no text refinement,
and optionally a fixed number of GPT steps so that variants are timed on equal work."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit import chattts
from quantkit.chattts import SAMPLE_RATE, SAMPLES_PER_STEP
from quantkit.compile import compiled_decoding, last_decode_steps

if TYPE_CHECKING:
    from ChatTTS import Chat


def expected_samples(steps: int) -> int:
    """Vocos' centred ISTFT returns hop * (frames - 1) samples for `frames` mel frames."""
    return steps * SAMPLES_PER_STEP - SAMPLES_PER_STEP // 2


@dataclass
class Synthesis:
    wav: np.ndarray  # float32 at 24 kHz, not stripped of near-silent samples
    tokens: torch.Tensor  # (steps, num_vq) audio codes
    steps: int
    gpt_s: float  # embedding, prefill, decode steps and sampling
    decode_s: float  # DVAE decoder and Vocos
    step_s: float | None = None  # one decode step, prompt pass excluded (compiled decoding only)

    @property
    def total_s(self) -> float:
        return self.gpt_s + self.decode_s

    @property
    def audio_s(self) -> float:
        return self.steps * SAMPLES_PER_STEP / SAMPLE_RATE


def fixed_speaker(chat: Chat, seed: int) -> str:
    """A speaker embedding drawn from ChatTTS's own speaker statistics with a fixed seed."""
    return chattts.seeded_speaker(chat, seed)


def _sync(chat: Chat) -> None:
    if "cuda" in str(chat.device):
        torch.cuda.synchronize()


def infer_params(chat: Chat, seed: int, steps: int | None, max_new_tokens: int,
                 speaker: str | None) -> Chat.InferCodeParams:
    return chat.InferCodeParams(
        spk_emb=speaker if speaker is not None else fixed_speaker(chat, seed),
        manual_seed=seed,
        # min == max forces exactly `steps` steps: ChatTTS masks EOS until min_new_token.
        min_new_token=steps or 0,
        max_new_token=steps or max_new_tokens,
        show_tqdm=False,
    )


@torch.no_grad()
def synthesize(chat: Chat, text: str, seed: int = 0, steps: int | None = None,
               max_new_tokens: int = 2048, speaker: str | None = None) -> Synthesis:
    """Same chat, text, seed and steps -> the same audio, bit for bit."""
    params = infer_params(chat, seed, steps, max_new_tokens, speaker)
    normed = chattts.normalize(chat, text)
    _sync(chat)
    t0 = time.perf_counter()
    result = chattts.infer_code(chat, [normed], params)
    tokens = result.ids[0].detach().cpu().clone()
    _sync(chat)
    t1 = time.perf_counter()
    wav = chattts.decode(chat, result.hiddens)[0]
    _sync(chat)
    t2 = time.perf_counter()
    timed = last_decode_steps(chat)
    return Synthesis(wav=np.asarray(wav, dtype=np.float32), tokens=tokens, steps=int(tokens.shape[0]),
                     gpt_s=t1 - t0, decode_s=t2 - t1, step_s=timed[1] / timed[0] if timed else None)


@dataclass
class TeacherForced:
    logprobs: torch.Tensor  # (steps, num_vq, num_audio_tokens), fp32 log-softmax of raw logits
    logmel: torch.Tensor  # (n_mels, frames) log-mel of decoder+vocoder output on these hiddens


@torch.no_grad()
def teacher_forced(chat: Chat, text: str, tokens: torch.Tensor, seed: int = 0,
                   speaker: str | None = None) -> TeacherForced:
    """Run the GPT once over prompt + reference tokens (no sampling) and decode the hidden
    states: what this variant predicts and sounds like on someone else's token sequence."""
    params = infer_params(chat, seed, None, 1, speaker)
    emb = chattts.prompt_embeddings(chat, chattts.normalize(chat, text), params)
    tokens = tokens.to(emb.device)
    # A compiled recipe is judged on what its compiled step computes, not on its eager modules.
    gen = compiled_decoding(chat)
    hidden = gen.forced_hidden(emb, tokens) if gen is not None else None
    if hidden is None:  # position L-1+i predicts token i, as in ChatTTS's loop
        hidden = chattts.eager_hidden(chat, emb, tokens)
    logits = chattts.head_logits(chat, hidden)
    wav = chattts.decode(chat, [hidden])[0]
    return TeacherForced(logprobs=torch.log_softmax(logits, -1).cpu(), logmel=log_mel(wav))


def log_mel(wav: np.ndarray) -> torch.Tensor:
    """Vocos-style log-mel (100 bins, 24 kHz): the space the vocoder was trained to invert."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=256,
                                               n_mels=100, power=1)(torch.from_numpy(np.asarray(wav)))
    return torch.log(torch.clamp(mel, min=1e-5))
