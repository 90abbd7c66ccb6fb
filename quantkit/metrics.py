"""Error rates (WER for English, CER for Chinese) with jiwer, and fidelity against fp32.

English: Whisper's EnglishTextNormalizer on both sides, then word error rate.
Chinese: Traditional folded to Simplified (OpenCC), Arabic digits spelled as Chinese numerals
(so 7点半 and 七点半 agree), punctuation and spaces removed, then character error rate.
Per-utterance error is capped at 1: a hallucination loop would otherwise dominate the mean.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jiwer
import numpy as np

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import torch

METRIC = {"en": "wer", "zh": "cer"}


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc

    return opencc.OpenCC("t2s")


def normalize_en(text: str) -> str:
    return _english_normalizer()(text)


_DIGITS = re.compile(r"\d+(?:\.\d+)?")


def normalize_zh(text: str) -> str:
    import cn2an

    text = _t2s().convert(unicodedata.normalize("NFKC", text))
    text = _DIGITS.sub(lambda m: cn2an.transform(m.group(0), "an2cn"), text)
    # drop punctuation, symbols and spaces; keep letters and digits of any script
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN").lower()


def normalize(text: str, language: str) -> str:
    if language == "en":
        return normalize_en(text)
    if language == "zh":
        return normalize_zh(text)
    raise QuantkitError(f"unsupported language '{language}' (allowed: en, zh)")


@dataclass
class ErrorRates:
    metric: str  # "wer" or "cer"
    per_utterance: list[float] = field(default_factory=list)  # each capped at 1
    mean: float = 0.0
    corpus: float = 0.0  # total edits / total reference length, uncapped
    uncapped: list[float] = field(default_factory=list)  # per utterance (Seed-TTS-eval averages these)


def _edits(ref: str, hyp: str, language: str) -> tuple[int, int]:
    """(edit count, reference length) in words (en) or characters (zh)."""
    if language == "zh":
        if not hyp:
            return len(ref), len(ref)
        out = jiwer.process_characters(ref, hyp)
        return out.substitutions + out.deletions + out.insertions, len(ref)
    n_ref = len(ref.split())
    if not hyp.strip():
        return n_ref, n_ref
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, n_ref


def check_references(references: dict[str, str], language: str) -> None:
    """Raise, naming the id, for a reference with nothing left to score against: before the slow work."""
    _normalized_references(list(references), list(references.values()), language)


def _normalized_references(ids: list[str], references: list[str], language: str) -> list[str]:
    normalized = [normalize(ref, language) for ref in references]
    for uid, ref in zip(ids, normalized):
        if not ref.strip():
            raise QuantkitError(f"reference '{uid}' is empty after normalisation: nothing to score against")
    return normalized


def error_rates(references: list[str], hypotheses: list[str], language: str,
                ids: list[str] | None = None) -> ErrorRates:
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    ids = ids or [str(i) for i in range(len(references))]
    refs_n = _normalized_references(ids, references, language)
    per, uncapped, edits, total = [], [], 0, 0
    for ref_n, hyp in zip(refs_n, hypotheses):
        hyp_n = normalize(hyp, language)
        e, n = _edits(ref_n, hyp_n, language)
        per.append(min(1.0, e / n))
        uncapped.append(e / n)
        edits, total = edits + e, total + n
    return ErrorRates(metric=METRIC[language], per_utterance=per, uncapped=uncapped,
                      mean=float(np.mean(per)) if per else 0.0,
                      corpus=edits / total if total else 0.0)


def bootstrap_delta(errors: list[float], reference: list[float], n: int = 2000,
                    seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean paired difference (errors - reference) over utterances and its 95% bootstrap interval."""
    d = np.asarray(errors, dtype=float) - np.asarray(reference, dtype=float)
    if d.size == 0:
        return 0.0, (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    return float(d.mean()), (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


@dataclass
class Fidelity:
    token_agreement: float  # teacher-forced top-1 agreement with fp32, all codebooks
    per_codebook: list[float]
    kl: float  # mean KL(fp32 || variant) of next-token distributions, nats
    mel_distance: float  # mean |log-mel difference| of decoder+vocoder output


def fidelity(ref_logprobs: torch.Tensor, logprobs: torch.Tensor, ref_logmel: torch.Tensor,
             logmel: torch.Tensor) -> Fidelity:
    """Compare a variant's teacher-forced outputs with the fp32 reference's on the same tokens."""
    import torch

    agree = (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).float()  # (steps, num_vq)
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).clamp_min(0)
    frames = min(ref_logmel.shape[-1], logmel.shape[-1])
    mel = (ref_logmel[..., :frames] - logmel[..., :frames]).abs().mean()
    return Fidelity(token_agreement=float(agree.mean()), per_codebook=agree.mean(0).tolist(),
                    kl=float(kl.mean()), mel_distance=float(mel if torch.isfinite(mel) else float("inf")))


def combine_fidelity(items: list[Fidelity], weights: list[int]) -> Fidelity:
    """Step-weighted average over utterances."""
    w = np.asarray(weights, dtype=float) / max(sum(weights), 1)
    return Fidelity(
        token_agreement=float(sum(f.token_agreement * x for f, x in zip(items, w))),
        per_codebook=[float(v) for v in np.sum([np.asarray(f.per_codebook) * x for f, x in zip(items, w)], 0)],
        kl=float(sum(f.kl * x for f, x in zip(items, w))),
        mel_distance=float(sum(f.mel_distance * x for f, x in zip(items, w))),
    )
