"""Audio reading (libsndfile), WAV writing (16-bit PCM, stdlib ``wave``) and resampling."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from quantkit.atomic import atomic_path
from quantkit.errors import QuantkitError


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM, atomically (temp file, then rename)."""
    pcm = (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 audio and its sample rate, channels averaged: any WAV (8/16/24/32-bit PCM,
    float, extensible), FLAC, OGG or MP3, as libsndfile reads them (ChatTTS's own example saves float
    WAVs, which the stdlib's ``wave`` refuses)."""
    import soundfile

    if not Path(path).exists() or Path(path).is_dir():  # a pipe (`<(...)`) is read
        raise QuantkitError(f"cannot read audio {path}: {'a folder' if Path(path).is_dir() else 'no such file'}")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:
        raise QuantkitError(f"cannot read audio {path}: {exc.error_string.rstrip('.').lower()}") from None
    if data.shape[0] == 0 or rate <= 0:
        raise QuantkitError(f"cannot read audio {path}: it holds no samples")
    return (data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)), rate


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited (windowed sinc) resampling via torchaudio; float32 in, float32 out."""
    if orig_sr == target_sr:
        return np.asarray(audio, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.asarray(audio, dtype=np.float32)), orig_sr, target_sr)
    return out.numpy()
