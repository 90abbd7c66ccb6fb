"""The one adapter onto ChatTTS's internals (chattts 0.2.5): everything that reads or replaces
a private attribute of a ``Chat`` or its GPT lives here, so a ChatTTS release that renames
one breaks this module alone. The rest of quantkit gets plain modules and tensors from it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.generate import Progress
from quantkit.quiet import quieted
from quantkit.sampling import Sampling

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from ChatTTS import Chat
    from ChatTTS.config import Config
    from ChatTTS.model.gpt import GPT

    from quantkit.static_cache import StaticCacheGPT

SAMPLE_RATE = 24000
SAMPLES_PER_STEP = 512  # each GPT step becomes 2 mel frames of 256 samples
MAX_POSITIONS = 4096  # ChatTTS's GPT (its Config.gpt.max_position_embeddings)


def check_steps(steps: int | None, option: str = "--steps") -> None:
    """Refuse a fixed step count beyond ChatTTS's GPT's positions (prompt included), before the
    load. Compiled recipes grow their KV cache to fit."""
    if steps is not None and steps >= MAX_POSITIONS:
        raise QuantkitError(f"{option} {steps} does not fit: ChatTTS's GPT has {MAX_POSITIONS} positions, "
                            f"prompt included, so {option} must stay below {MAX_POSITIONS} minus the prompt's length")


def static_model(chat: Chat, capacity: int, cache_dtype: torch.dtype | None = None) -> StaticCacheGPT:
    """ChatTTS's GPT as a quantkit.static_cache.StaticCacheGPT: its Llama, code and text
    embeddings and heads, on its GPT device."""
    from quantkit.static_cache import StaticCacheGPT

    e = chat.embed
    return StaticCacheGPT(chat.gpt.gpt, e.emb_code, e.head_code, e.emb_text, e.head_text,
                          torch.device(chat.device_gpt), capacity, cache_dtype)


def num_audio_tokens(chat: Chat) -> int:
    return int(chat.config.gpt.num_audio_tokens)


def generator(chat: Chat) -> torch.Generator:
    """The generator ChatTTS's loop re-seeds with ``manual_seed`` for every draw."""
    return chat.gpt.generator


def default_sampling(chat: Chat) -> Sampling:
    """The Sampling that ChatTTS's default InferCodeParams give."""
    num_code = num_audio_tokens(chat) - 1
    return _params_sampling(chat.InferCodeParams(), num_code, num_code)


def default_text_sampling(chat: Chat) -> Sampling | None:
    """The Sampling that ChatTTS's default RefineTextParams give (its ``_refine_text``)."""
    return _params_sampling(chat.RefineTextParams(), chat.tokenizer.len, int(chat.tokenizer.eos_token))


def _params_sampling(p, num_code: int, eos: int) -> Sampling | None:
    """The Sampling of ChatTTS's logits pipeline (``gen_logits``) for the params ``p``."""
    from ChatTTS.model import gen_logits

    warpers, processors = gen_logits(num_code=num_code, top_P=p.top_P, top_K=p.top_K,
                                     repetition_penalty=p.repetition_penalty)
    return sampling_from((*processors, *warpers), eos)


def sampling_from(processors: Sequence, eos: int) -> Sampling | None:
    """ChatTTS's logits processors and warpers, read into a Sampling; None if one is of a kind
    the static-cache path does not know."""
    from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

    from ChatTTS.model.processors import CustomRepetitionPenaltyLogitsProcessorRepeat as Rep

    penalty, window, top_p, keep, top_k = None, 16, None, 1, None
    for i, p in enumerate(processors):
        if isinstance(p, Rep) and i == 0:
            penalty, window = float(p.penalty), int(p.past_window)
        elif isinstance(p, TopPLogitsWarper) and top_k is None:
            top_p, keep = float(p.top_p), int(p.min_tokens_to_keep)
        elif isinstance(p, TopKLogitsWarper):
            top_k = int(p.top_k)
        else:
            return None
    return Sampling(penalty, window, top_p, keep, top_k, int(eos))


def generation_outputs(progress: Progress, dtype: torch.dtype, text: bool) -> GPT.GenerationOutputs:
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


def install_generate(chat: Chat, generate: Callable) -> None:
    """Route ChatTTS's code generation and text refinement through ``generate``, a callable with
    ``GPT.generate``'s signature."""
    chat.gpt.generate = generate


def installed_generate(chat: Chat) -> Callable:
    """What ``chat`` generates with: quantkit's CompiledGenerate where installed."""
    return chat.gpt.generate


def rebind_heads(chat: Chat) -> None:
    """ChatTTS's GPT keeps bound ``__call__`` methods of the embedding heads from construction
    time; quantizers that swap modules would otherwise leave it calling the old ones."""
    chat.gpt.head_code = [hc.__call__ for hc in chat.embed.head_code]
    chat.gpt.emb_code = [ec.__call__ for ec in chat.embed.emb_code]


def components(chat: Chat) -> dict[str, nn.Module]:
    """The modules a recipe's component tables act on. heads: the four audio-code heads (the
    text head only serves text refinement). vocos: its backbone; the ISTFT head needs fp32."""
    return {"gpt": chat.gpt.gpt, "heads": chat.embed.head_code, "decoder": chat.decoder,
            "vocos": chat.vocos.backbone}


# ---------------------------------------------------------------- creating and loading

def new_chat(overrides: dict, speaker_stat: str | None = None) -> Chat:
    """A ChatTTS ``Chat`` whose Config (a copy) has ``overrides`` applied, before loading."""
    import copy
    import logging

    import ChatTTS

    _quiet_chattts_deprecations()
    chat = ChatTTS.Chat(logging.getLogger("ChatTTS"))
    # Config's defaults are shared class-level instances: copy before editing.
    chat.config = copy.deepcopy(chat.config)
    _apply_overrides(chat.config, overrides)
    if speaker_stat is not None:
        chat.config.spk_stat = speaker_stat
    return chat


class _PastKeyValuesNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "past_key_values" not in record.getMessage()


def _quiet_chattts_deprecations() -> None:
    """ChatTTS 0.2.5 passes ``past_key_values`` to transformers' Llama, which warns twice a
    process: a notice meant for ChatTTS's authors, not for a user who can do nothing about it."""
    import warnings

    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    generic = logging.getLogger("transformers.utils.generic")
    if not any(isinstance(f, _PastKeyValuesNotice) for f in generic.filters):
        generic.addFilter(_PastKeyValuesNotice())


def _apply_overrides(obj, overrides: dict) -> None:
    """Shrink ChatTTS's nested Config dataclasses in place (before Chat._load reads them)."""
    for key, value in overrides.items():
        if not hasattr(obj, key):
            raise KeyError(key)
        if isinstance(value, dict):
            _apply_overrides(getattr(obj, key), value)
        else:
            setattr(obj, key, tuple(value) if isinstance(value, list) else value)


def config(chat: Chat) -> Config:
    """ChatTTS's Config of this chat (sizes of every component)."""
    return chat.config


def load(chat: Chat, root: str | Path, device: torch.device, compile: bool = False) -> bool:
    """ChatTTS's own ``Chat._load`` on an asset directory ``root``; False where a component is
    missing. ``compile``: ChatTTS's own ``compile=True`` (it compiles the GPT on CUDA only)."""
    from dataclasses import asdict
    from pathlib import Path

    paths = {k: str(Path(root) / v) for k, v in asdict(chat.config.path).items()}
    return bool(chat._load(device=device, compile=compile, **paths))


def random_components(chat: Chat) -> dict[str, nn.Module]:
    """Every component but the GPT, built from ChatTTS's own classes for ``chat``'s Config with
    the current random state: asset file stem -> module."""
    from dataclasses import asdict

    from vocos import Vocos
    from vocos.pretrained import instantiate_class

    from ChatTTS.model import DVAE, Embed

    cfg = chat.config
    return {
        "Vocos": Vocos(feature_extractor=instantiate_class(args=(), init=asdict(cfg.vocos.feature_extractor)),
                       backbone=instantiate_class(args=(), init=asdict(cfg.vocos.backbone)),
                       head=instantiate_class(args=(), init=asdict(cfg.vocos.head))),
        "DVAE": DVAE(decoder_config=asdict(cfg.dvae.decoder), encoder_config=asdict(cfg.dvae.encoder),
                     vq_config=asdict(cfg.dvae.vq), dim=cfg.dvae.decoder.idim),
        "Decoder": DVAE(decoder_config=asdict(cfg.decoder), dim=cfg.decoder.idim),
        "Embed": Embed(cfg.embed.hidden_size, cfg.embed.num_audio_tokens, cfg.embed.num_text_tokens,
                       cfg.embed.num_vq),
    }


def llama_config(chat: Chat) -> dict:
    """The Llama configuration ChatTTS builds its GPT from (its own keys left out)."""
    from dataclasses import asdict

    return {k: v for k, v in asdict(chat.config.gpt).items()
            if k not in ("spk_emb_dim", "spk_KL", "num_audio_tokens", "num_text_tokens", "num_vq")}


class StoredGPT:
    """While active in this thread, ChatTTS's loader gets its GPT from ``load(gpt_folder)``
    instead of reading the fp32 weights (``LlamaModel.from_pretrained`` in ChatTTS.model.gpt).
    The module attribute is shared by every thread: while any thread loads a variant it holds a
    dispatcher, which serves other threads' loads (a variant's or ChatTTS's own) as their own."""

    _lock = threading.Lock()
    _active = 0  # threads inside a StoredGPT
    _original: type | None = None
    _local = threading.local()

    def __init__(self, load_fn: Callable):
        self.load_fn = load_fn

    def __enter__(self) -> StoredGPT:
        import ChatTTS.model.gpt as chattts_gpt

        cls = StoredGPT
        with cls._lock:
            if cls._active == 0:
                cls._original = chattts_gpt.LlamaModel
                chattts_gpt.LlamaModel = type("StoredLlamaModel", (), {"from_pretrained": staticmethod(cls._dispatch)})
            cls._active += 1
        self.outer, cls._local.load_fn = getattr(cls._local, "load_fn", None), self.load_fn
        return self

    def __exit__(self, *exc) -> None:
        import ChatTTS.model.gpt as chattts_gpt

        cls = StoredGPT
        cls._local.load_fn = self.outer
        with cls._lock:
            cls._active -= 1
            if cls._active == 0:
                chattts_gpt.LlamaModel = cls._original

    @staticmethod
    def _dispatch(gpt_folder, *args, **kwargs):
        load_fn = getattr(StoredGPT._local, "load_fn", None)
        if load_fn is None:  # another thread's load, not a variant's
            return StoredGPT._original.from_pretrained(gpt_folder, *args, **kwargs)
        return load_fn(gpt_folder, *args, **kwargs)


# ---------------------------------------------------------------- components

def check_loaded(chat: Chat) -> None:
    """Refuse a Chat that has no model to change: never loaded, or its ``load`` returned False."""
    missing = [m for m in ("gpt", "embed", "decoder", "vocos", "tokenizer") if not hasattr(chat, m)]
    if missing:
        raise QuantkitError(f"this Chat is not loaded (it has no {', '.join(missing)}): load it first "
                            "(quantkit.load_chat, or chat.load(...) returning True)")


def gpt(chat: Chat) -> nn.Module:
    """The GPT's transformer (a transformers LlamaModel)."""
    return chat.gpt.gpt


def gpt_device(chat: Chat) -> torch.device:
    return torch.device(chat.device_gpt)


def weight_groups(chat: Chat) -> dict[str, list[nn.Module]]:
    """Modules by role in a decode step: streamed every step (transformer, code heads), looked
    up (code embeddings), and the rest."""
    e = chat.embed
    return {"gpt": [chat.gpt.gpt], "heads": [e.head_code], "tables": [e.emb_code],
            "rest": [e.emb_text, e.head_text, chat.decoder, chat.vocos]}


def all_modules(chat: Chat) -> list[nn.Module]:
    return [chat.gpt.gpt, chat.embed, chat.decoder, chat.vocos]


@torch.inference_mode()
def probe(chat: Chat, name: str, dtype: torch.dtype) -> None:
    """One tiny forward through a component (``dtype``: the GPT's), so that a kernel the device
    lacks fails at once, naming the component."""
    hidden, dev = chat.config.gpt.hidden_size, chat.device
    gen = torch.Generator(device=dev).manual_seed(0)  # the caller's random state stays as it was

    def noise(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    if name == "gpt":
        chat.gpt.gpt(inputs_embeds=noise(1, 3, hidden, dtype=dtype), use_cache=False)
    elif name == "heads":
        chat.gpt.head_code[0](noise(1, hidden))
    elif name == "decoder":
        chat.decoder(noise(1, hidden, 4))
    else:
        chat.vocos.decode(noise(1, 100, 8))


# ---------------------------------------------------------------- synthesis

def seeded_speaker(chat: Chat, seed: int) -> str:
    """ChatTTS's ``sample_random_speaker`` drawn from a generator of its own: the speaker that
    follows ``torch.manual_seed(seed)``, without touching the random state other threads share."""
    spk = chat.speaker
    gen = torch.Generator(device=spk.std.device).manual_seed(seed)
    emb = torch.randn(spk.dim, generator=gen, device=spk.std.device, dtype=spk.std.dtype)
    return spk._encode(emb.mul_(spk.std).add_(spk.mean))


def normalize(chat: Chat, text: str) -> str:
    """ChatTTS's text normalization, as ``infer`` applies it by default."""
    return chat.normalizer(text, True, True, None)


def warm_normalizer(chat: Chat) -> None:
    """Have ChatTTS's normalizer JIT-compile its numba functions now (seconds), not at a user's
    first call: a plain text compiles only some; characters it rejects (digits, for one) and
    tags such as [uv_break] reach the others."""
    with quieted(chat.normalizer.logger):  # the warm-up's rejected digit is not the user's
        chat.normalizer("Ready [uv_break] 1.", True, True, None)


def infer_code(chat: Chat, texts: list[str], params: Chat.InferCodeParams) -> GPT.GenerationOutputs:
    """ChatTTS's code generation for already normalized texts -> GenerationOutputs (hiddens too)."""
    return next(chat._infer_code(texts, False, chat.device, True, params))


def install_chunked_stream_decode(chat: Chat) -> None:
    """Bound the decoder and vocoder's work per streamed hand-over (quantkit.streaming): ChatTTS's
    ``_infer`` decodes through ``_decode_to_wavs`` at every hand-over."""
    from quantkit.streaming import ChunkedDecode

    if not isinstance(chat._decode_to_wavs, ChunkedDecode):
        chat._decode_to_wavs = ChunkedDecode(chat._decode_to_wavs, SAMPLES_PER_STEP)


def decode(chat: Chat, hiddens: list[torch.Tensor]) -> list:
    """ChatTTS's decoder and vocoder on GPT hidden states -> one waveform each."""
    return chat._decode_to_wavs(hiddens, True)


def prompt_embeddings(chat: Chat, text: str, params: Chat.InferCodeParams) -> torch.Tensor:
    """The GPT's input embeddings for one normalized text's code prompt (speaker applied)."""
    prompts = chat.speaker.decorate_code_prompts([text], params.prompt, params.txt_smp, params.spk_emb)
    input_ids, _mask, text_mask = chat.tokenizer.encode(prompts, chat.config.gpt.num_vq, device=chat.device_gpt)
    emb = chat.embed(input_ids, text_mask)
    chat.speaker.apply(emb, params.spk_emb, input_ids, chat.tokenizer.spk_emb_ids, chat.device_gpt)
    return emb


def eager_hidden(chat: Chat, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """ChatTTS's GPT run once over prompt ``emb`` (1, L, H) and ``tokens`` (n, num_vq) -> the n
    hidden states (n, H), fp32, row i being what predicts token i."""
    from quantkit.precision import float_dtype

    code = torch.stack([chat.gpt.emb_code[i](tokens[:, i]) for i in range(tokens.shape[1])]).sum(0)
    inputs = torch.cat([emb[0], code[:-1].to(emb.dtype)])[None]
    out = chat.gpt.gpt(inputs_embeds=inputs.to(float_dtype(chat.gpt.gpt)), use_cache=False)
    return out.last_hidden_state[0, emb.shape[1] - 1:].float()


def head_logits(chat: Chat, hidden: torch.Tensor) -> torch.Tensor:
    """The code heads' logits for hidden states (n, H) -> (n, num_vq, vocab), fp32."""
    return torch.stack([head(hidden) for head in chat.gpt.head_code], 1).float()
