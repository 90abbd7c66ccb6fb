"""WAV reading and writing (16-bit PCM, stdlib ``wave``) and resampling."""

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
    """Mono float32 audio and its sample rate; 8/16/32-bit PCM, channels averaged."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as exc:
        raise QuantkitError(f"cannot read audio {path}: {exc}") from None
    kinds = {1: (np.uint8, 128.0, 128.0), 2: ("<i2", 0.0, 32768.0), 4: ("<i4", 0.0, 2147483648.0)}
    if width not in kinds:
        raise QuantkitError(f"cannot read audio {path}: {8 * width}-bit samples are not supported")
    dtype, offset, scale = kinds[width]
    frames = len(raw) // (width * channels)  # a truncated file ends in a partial frame
    if frames == 0 or rate <= 0:
        raise QuantkitError(f"cannot read audio {path}: it holds no samples")
    pcm = np.frombuffer(raw[: frames * width * channels], dtype=dtype)
    data = (pcm.astype(np.float32) - offset) / scale
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data, rate


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited (windowed sinc) resampling via torchaudio; float32 in, float32 out."""
    if orig_sr == target_sr:
        return np.asarray(audio, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.asarray(audio, dtype=np.float32)), orig_sr, target_sr)
    return out.numpy()
