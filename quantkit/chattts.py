"""The one adapter onto ChatTTS's internals (chattts 0.2.5): everything that reads or replaces
a private attribute of a ``Chat`` or its GPT lives here, so a ChatTTS release that renames
one breaks this module alone. The rest of quantkit gets plain modules and tensors from it.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.generate import Progress
from quantkit.sampling import Sampling, sampling_from


def static_model(chat, capacity: int):
    """ChatTTS's GPT as a quantkit.static_cache.StaticCacheGPT: its Llama, code and text
    embeddings and heads, on its GPT device."""
    from quantkit.static_cache import StaticCacheGPT

    e = chat.embed
    return StaticCacheGPT(chat.gpt.gpt, e.emb_code, e.head_code, e.emb_text, e.head_text,
                          torch.device(chat.device_gpt), capacity)


def num_audio_tokens(chat) -> int:
    return int(chat.config.gpt.num_audio_tokens)


def generator(chat) -> torch.Generator:
    """The generator ChatTTS's loop re-seeds with ``manual_seed`` for every draw."""
    return chat.gpt.generator


def default_sampling(chat) -> Sampling:
    """The Sampling that ChatTTS's default InferCodeParams give."""
    from ChatTTS.model import gen_logits

    p = chat.InferCodeParams()
    num_code = num_audio_tokens(chat) - 1
    warpers, processors = gen_logits(num_code=num_code, top_P=p.top_P, top_K=p.top_K,
                                     repetition_penalty=p.repetition_penalty)
    return sampling_from((*processors, *warpers), num_code)


def generation_outputs(progress: Progress, dtype: torch.dtype, text: bool):
    """ChatTTS's ``GPT.GenerationOutputs`` for the decode loop's progress: each row's tokens and
    hidden states up to its EOS (text refinement: one token a step, not num_vq)."""
    from ChatTTS.model.gpt import GPT

    tokens = progress.tokens.to(dtype)
    ids = [tokens[b, :int(end)] for b, end in enumerate(progress.ends)]
    if text:
        ids = [i[:, 0] for i in ids]
    hiddens = [] if progress.hiddens is None else [progress.hiddens[b, :int(end)]
                                                   for b, end in enumerate(progress.ends)]
    return GPT.GenerationOutputs(ids=ids, attentions=[], hiddens=hiddens)


def install_generate(chat, generate) -> None:
    """Route ChatTTS's code generation and text refinement through ``generate``, a callable with
    ``GPT.generate``'s signature."""
    chat.gpt.generate = generate


def installed_generate(chat):
    """What ``chat`` generates with: quantkit's CompiledGenerate where installed."""
    return chat.gpt.generate


def rebind_heads(chat) -> None:
    """ChatTTS's GPT keeps bound ``__call__`` methods of the embedding heads from construction
    time; quantizers that swap modules would otherwise leave it calling the old ones."""
    chat.gpt.head_code = [hc.__call__ for hc in chat.embed.head_code]
    chat.gpt.emb_code = [ec.__call__ for ec in chat.embed.emb_code]


def components(chat) -> dict[str, nn.Module]:
    """The modules a recipe's component tables act on. heads: the four audio-code heads (the
    text head only serves text refinement). vocos: its backbone; the ISTFT head needs fp32."""
    return {"gpt": chat.gpt.gpt, "heads": chat.embed.head_code, "decoder": chat.decoder,
            "vocos": chat.vocos.backbone}
