"""Streaming's decoder and vocoder work is bounded per hand-over and gives the waveform a whole
decode gives (quantkit.streaming), on the full-size decoder and vocoder."""

import numpy as np
import pytest
import torch

from quantkit import chattts
from quantkit.models import load_chat
from quantkit.streaming import CONTEXT, ChunkedDecode


@pytest.fixture(scope="module")
def full_reach():
    """The full-size synthetic decoder and vocoder with their ConvNeXt layer scales at 1: random
    weights keep ChatTTS's initial 1e-6, which would make every block nearly the identity and
    hide how far the convolutions reach."""
    from ChatTTS.model.dvae import ConvNeXtBlock
    from vocos.modules import ConvNeXtBlock as VocosBlock

    chat = load_chat("synthetic")
    comps = chattts.components(chat)
    scaled = 0
    with torch.no_grad():
        for module in (*comps["decoder"].modules(), *comps["vocos"].modules()):
            if isinstance(module, ConvNeXtBlock):
                module.weight.fill_(1.0)
                scaled += 1
            elif isinstance(module, VocosBlock):
                module.gamma.fill_(1.0)
                scaled += 1
    assert scaled == 20  # the decoder's 12 blocks and the vocoder's 8
    return chat


def decoder_of(chat, given: list | None = None):
    """ChatTTS's own decode (no recipe installed anything on this chat), noting in ``given`` the
    tokens per row that each call hands the decoder."""
    def decode(hiddens, use_decoder):
        if given is not None:
            given.append(max(h.shape[0] for h in hiddens))
        return chattts.decode(chat, hiddens)
    return decode


def hand_overs(decode, hidden: torch.Tensor, every: int = 24):
    """What a stream's hand-overs ask of the decoder: the prefix every ``every`` tokens."""
    for n in range(every, hidden.shape[0] + 1, every):
        yield n, decode([hidden[:n]], True)


def test_a_stream_decodes_a_bounded_window_into_the_whole_waveform(full_reach):
    whole = decoder_of(full_reach)
    torch.manual_seed(0)
    hidden = torch.randn(360, 768) * 0.8
    decoded = []
    chunked = ChunkedDecode(decoder_of(full_reach, decoded), chattts.SAMPLES_PER_STEP)
    for n, wav in hand_overs(chunked, hidden):
        ref = whole([hidden[:n]], True)
        assert wav.shape == ref.shape
        np.testing.assert_allclose(wav, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert max(decoded[-5:]) == 24 + 2 * CONTEXT  # bounded, not the whole prefix
    assert decoded[:5] == [24, 48, 72, 96, 120]  # until the first 2 x CONTEXT tokens: whole


def test_a_too_short_context_shows_at_the_joins(full_reach):
    """The check above can fail: with 8 tokens of context the joins differ."""
    whole = decoder_of(full_reach)
    torch.manual_seed(0)
    hidden = torch.randn(240, 768) * 0.8
    short = ChunkedDecode(whole, chattts.SAMPLES_PER_STEP, context=8)
    n, wav = list(hand_overs(short, hidden))[-1]
    ref = whole([hidden[:n]], True)
    assert np.abs(wav - ref).max() > 1e-4 * np.abs(ref).max()


def test_calls_that_do_not_extend_the_last_decode_whole(full_reach):
    whole = decoder_of(full_reach)
    torch.manual_seed(1)
    a, b = torch.randn(200, 768), torch.randn(220, 768)
    decoded = []
    chunked = ChunkedDecode(decoder_of(full_reach, decoded), chattts.SAMPLES_PER_STEP)
    chunked([a], True)
    np.testing.assert_array_equal(chunked([b], True), whole([b], True))  # another utterance
    assert decoded[-1] == 220
    chunked([a[:150], a[:150]], True)
    chunked([a[:170], a[:160]], True)  # rows of unequal lengths: ChatTTS pads them
    assert decoded[-1] == 170
