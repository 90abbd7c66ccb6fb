"""ChatTTS's sampling (repetition penalty, temperature, top-p, top-k, EOS mask, multinomial
draw) as tensor code a compiled decode step can hold.

``torch.multinomial`` draws one sample as the argmax of probabilities over Exp(1) noise, so the
step takes the noise ChatTTS's seeded call would draw (``draw``, ``ExpNoise``) and the same seed
picks the same tokens as ChatTTS's loop (the equivalence tests rely on it). A step then costs the
host no tensor operations but reading whether EOS came.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    """ChatTTS's logits pipeline, reduced to constants (one compiled step per distinct value)."""
    penalty: float | None  # CustomRepetitionPenaltyLogitsProcessorRepeat
    past_window: int
    top_p: float | None  # TopPLogitsWarper
    top_p_keep: int
    top_k: int | None  # TopKLogitsWarper (already max(top_k, min_tokens_to_keep))
    eos: int


def process_logits(logits: torch.Tensor, window: torch.Tensor, temperature: torch.Tensor,
                   mask_eos: torch.Tensor, s: Sampling, sort: Callable = torch.sort) -> torch.Tensor:
    """Probabilities exactly as ChatTTS computes them: /T, repetition penalty over the last
    `past_window` generated tokens (window holds -1 where there are none yet), top-p, top-k,
    EOS masked before min_new_token, softmax. ``sort``: torch.sort or what returns the same."""
    logits = logits / temperature
    vocab = logits.size(1)
    if s.penalty is not None:
        # ChatTTS's one_hot(...).sum(1) counts, without its (rows, window, vocab) intermediate
        freq = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, window.clamp_min(0), (window >= 0).long())
        alpha = torch.pow(s.penalty, freq)
        logits = torch.where(logits < 0, logits * alpha, logits / alpha)
    if s.top_p is not None:
        logits = _top_p_then_k(logits, s, sort)
    elif s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, vocab))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    eos_col = torch.where(mask_eos, torch.full_like(logits[:, s.eos], -float("inf")), logits[:, s.eos])
    logits = torch.cat([logits[:, : s.eos], eos_col[:, None], logits[:, s.eos + 1:]], 1)
    return F.softmax(logits, dim=-1)


def _top_p_then_k(logits: torch.Tensor, s: Sampling, sort: Callable) -> torch.Tensor:
    """Top-p, then top-k, masked in sorted order and put back with one scatter, instead of aten's
    topk and a second scatter (docs/performance.md). Top-k's k-th largest value is read off the
    sorted row: where top-p removed it, top-k removes nothing more either way."""
    sorted_logits, sorted_idx = sort(logits)
    drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - s.top_p)
    drop[..., -s.top_p_keep:] = False
    if s.top_k is not None:
        drop |= sorted_logits < sorted_logits[:, -min(s.top_k, logits.size(1)), None]
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits.masked_fill(drop, -float("inf")))


def draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``torch.multinomial(probs, 1)`` (num_vq, vocab) given the Exp(1) ``noise`` it would draw
    -> (1, num_vq). Its one-sample path is exactly ``argmax(probs / noise)`` (the exponential form
    of the Gumbel-max trick); what is left out are its checks that probs are finite, non-negative
    and not all zero, which softmax guarantees: a dozen small host operations a step, slow with
    code and data evicted by the step's weight stream."""
    return (probs / noise).argmax(-1).view(1, -1)


class ExpNoise:
    """The Exp(1) noise ``torch.multinomial`` draws for one sample from probabilities of a given
    shape: from the global generator each step, or, seeded, from ChatTTS's generator re-seeded
    each step as its loop does, which draws the same noise every step: drawn once."""

    def __init__(self, generator: torch.Generator, seed: int | None, device: torch.device | str = "cpu"):
        self.generator, self.seed, self.device = generator, seed, device
        self.fixed: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(shape)
        if self.seed is None:
            return torch.empty(shape, device=self.device).exponential_(1)
        if shape not in self.fixed:
            self.fixed[shape] = torch.empty(shape, device=self.device).exponential_(
                1, generator=self.generator.manual_seed(self.seed))
        return self.fixed[shape]
