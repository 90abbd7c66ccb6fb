"""Streaming with the decoder and vocoder's work bounded per hand-over.

ChatTTS's streaming decodes the whole prefix of hidden states again at every hand-over (every
``stream_batch`` steps), so a long streamed utterance costs the decoder and vocoder work
quadratic in its length. Their layers are convolutions and per-frame operations: a sample
depends only on the hidden states within ``CONTEXT`` tokens of its own. ``ChunkedDecode``
therefore keeps the last waveform and, where a call extends the previous call's hidden states,
decodes only the new tokens with ``CONTEXT`` tokens of left context and joins them to the part
of the previous waveform that was already ``CONTEXT`` tokens from its end: the waveform a full
decode gives, to float rounding, so ChatTTS's own slicing of the stream is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Tokens either side that a sample depends on: the decoder's 12 dilated ConvNeXt blocks and the
# vocoder's 8 reach about 52 (two mel frames a token); tests/test_streaming.py checks the join.
CONTEXT = 64


class ChunkedDecode:
    """Drop-in for ChatTTS's ``Chat._decode_to_wavs(hiddens, use_decoder)`` -> (B, samples)."""

    def __init__(self, decode: Callable[[list[torch.Tensor], bool], np.ndarray], samples_per_token: int,
                 context: int = CONTEXT):
        # sample i of a decode from token w is sample w * samples_per_token + i of the whole
        # (the vocoder's frames are centred: n tokens make one frame less than n * samples_per_token)
        self.decode, self.per_token, self.context = decode, samples_per_token, context
        self.last: tuple[list[torch.Tensor], np.ndarray] | None = None

    def __call__(self, hiddens: list[torch.Tensor], use_decoder: bool) -> np.ndarray:
        rows = list(hiddens)  # ChatTTS's decode empties the list it is given
        start = self._reusable(rows) if use_decoder else None
        if start is None:
            wavs = self.decode(list(rows), use_decoder)
        else:
            window = start - self.context
            tail = self.decode([h[window:] for h in rows], use_decoder)
            done = self.last[1][:, :start * self.per_token]
            wavs = np.concatenate([done, tail[:, self.context * self.per_token:]], 1)
        self.last = (rows, wavs) if use_decoder and wavs.ndim == 2 else None
        return wavs

    def _reusable(self, rows: list[torch.Tensor]) -> int | None:
        """The token from which ``rows`` must be decoded anew (the previous waveform holds the
        final samples before it), or None where the previous call is no prefix of this one. Rows
        of unequal lengths (a batch whose rows stopped apart) decode whole: ChatTTS pads them."""
        if self.last is None or len(rows) != len(self.last[0]) or not rows:
            return None
        prev, wavs = self.last
        lengths, before = {h.shape[0] for h in rows}, {h.shape[0] for h in prev}
        if len(lengths) != 1 or len(before) != 1:
            return None
        n, n_prev = lengths.pop(), before.pop()
        start = n_prev - self.context  # samples before it had all their right context then
        if start < self.context or n < n_prev or wavs.shape[1] < start * self.per_token:
            return None
        if not all(h.shape[1:] == p.shape[1:] and torch.equal(h[:n_prev], p) for h, p in zip(rows, prev)):
            return None
        return start
