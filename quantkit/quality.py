"""Naturalness and speaker similarity, offline: DNSMOS (Microsoft's P.835 SIG/BAK/OVRL and
P.808 models, ONNX files inside the ``speechmos`` wheel, on onnxruntime, 16 kHz) and GE2E
speaker embeddings (``resemblyzer``'s ``pretrained.pt``; similarity is the cosine of two
utterances' embeddings)."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

import numpy as np

from quantkit.audio import resample

log = logging.getLogger(__name__)

RATE = 16000  # both models' input rate


@dataclass
class Mos:
    sig: float  # speech signal quality (P.835)
    bak: float  # background noise
    ovrl: float  # overall
    p808: float  # P.808 overall

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def dnsmos(audio: np.ndarray, rate: int) -> Mos:
    """DNSMOS of one utterance (shorter than 9 s: repeated, as the model's reference code does)."""
    from speechmos import dnsmos as model

    wav = np.clip(resample(audio, rate, RATE), -1.0, 1.0).astype(np.float32)
    out = model.run(wav, RATE)
    return Mos(sig=float(out["sig_mos"]), bak=float(out["bak_mos"]), ovrl=float(out["ovrl_mos"]),
               p808=float(out["p808_mos"]))


def _resemblyzer():
    """resemblyzer, imported without its webrtcvad's notice that pkg_resources is deprecated (a
    dependency's packaging, nothing a user can act on)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        import resemblyzer
    return resemblyzer


@functools.lru_cache(maxsize=1)
def _encoder():
    import torch

    with torch.device("cpu"):
        return _resemblyzer().VoiceEncoder(device="cpu", verbose=False)


def speaker_embedding(audio: np.ndarray, rate: int) -> np.ndarray:
    """The GE2E embedding of one utterance (unit length; silences trimmed by resemblyzer)."""
    audio16 = resample(audio, rate, RATE).astype(np.float32)
    wav = _resemblyzer().preprocess_wav(audio16, source_sr=RATE)
    if wav.size < RATE // 10:  # all silence by its voice activity detector: use the audio as it is
        wav = audio16
    return _encoder().embed_utterance(wav)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two speaker embeddings."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
