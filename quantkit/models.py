"""Model sources: the real ChatTTS weights, an asset directory, or synthetic weights.

Every source ends in the same place: ChatTTS's own ``Chat._load`` on a directory in
ChatTTS's asset layout (``asset/gpt``, ``asset/Embed.safetensors``, ...). Synthetic sources
write such a directory once (real module classes, seeded random weights) so that what we
measure on them is the real loading and inference code, only with noise for weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quantkit.atomic import cache_writer, write_error
from quantkit.cache import cache_dir
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from ChatTTS import Chat

log = logging.getLogger(__name__)

SOURCES = ("chattts", "synthetic", "synthetic-tiny")
SYNTHETIC_SEED = 20240528
OVERRIDES_FILE = "quantkit_config.json"
ASSET_FILES = (
    "asset/Vocos.safetensors",
    "asset/DVAE.safetensors",
    "asset/Decoder.safetensors",
    "asset/Embed.safetensors",
    "asset/gpt/config.json",
    "asset/gpt/model.safetensors",
    "asset/tokenizer/tokenizer.json",
)

# Config overrides per synthetic source; {} keeps ChatTTS's real dimensions.
# The decoder's idim must be half the GPT hidden size: it folds each hidden state into two frames.
SYNTHETIC_CONFIGS: dict[str, dict[str, Any]] = {
    "synthetic": {},
    "synthetic-tiny": {
        "gpt": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                "num_hidden_layers": 2},
        "embed": {"hidden_size": 64},
        "decoder": {"idim": 32, "odim": 32, "hidden": 32, "n_layer": 2, "bn_dim": 16},
        "dvae": {
            "encoder": {"idim": 32, "odim": 64, "hidden": 32, "n_layer": 1, "bn_dim": 16},
            "decoder": {"idim": 32, "odim": 32, "hidden": 32, "n_layer": 1, "bn_dim": 16},
            "vq": {"dim": 64},
        },
        "vocos": {"backbone": {"init_args": {"dim": 64, "intermediate_dim": 192, "num_layers": 1}},
                  "head": {"init_args": {"dim": 64}}},
    },
}

CHATTTS_SPECIAL_TOKENS = (
    ["[Stts]", "[Ptts]", "[spk_emb]", "[empty_spk]", "[Sbreak]", "[Pbreak]", "[Ebreak]",
     "[uv_break]", "[v_break]", "[lbreak]", "[laugh]", "[music]", "[pure]", "[init]"]
    + [f"[break_{i}]" for i in range(8)]
    + [f"[laugh_{i}]" for i in range(3)]
    + [f"[speed_{i}]" for i in range(10)]
    + [f"[oral_{i}]" for i in range(10)]
)




def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantkitError(f"device '{device}' requested but this torch build sees no CUDA GPU")
        return torch.device(device)
    raise QuantkitError(f"unknown device '{device}' (allowed: cpu, cuda, auto)")


def new_chat(overrides: dict[str, Any]) -> Chat:
    """A ChatTTS ``Chat`` with a synthetic source's Config overrides (before loading)."""
    from quantkit import chattts

    hidden = overrides.get("gpt", {}).get("hidden_size")
    try:
        return chattts.new_chat(overrides, _speaker_stat(hidden) if hidden is not None else None)
    except KeyError as exc:
        raise QuantkitError(f"{OVERRIDES_FILE}: ChatTTS's configuration has no {exc}") from None


def _speaker_stat(hidden: int) -> str:
    """Speaker statistics string (pybase16384 of float16 std then mean) for a given hidden size."""
    import pybase16384 as b14

    rng = np.random.default_rng(SYNTHETIC_SEED)
    std = rng.uniform(0.5, 1.5, hidden).astype(np.float16)
    mean = rng.normal(0.0, 0.1, hidden).astype(np.float16)
    return b14.encode_to_string(np.concatenate([std, mean]).tobytes())


# ---------------------------------------------------------------- synthetic assets

def _write_tokenizer(path: Path, num_text_tokens: int) -> None:
    """A BertTokenizerFast that knows ChatTTS's special tokens, padded with CJK characters
    to the text-embedding size (as the real one: bert-base-chinese's vocabulary plus tags)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CHATTTS_SPECIAL_TOKENS
    ascii_chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab += ascii_chars + ["##" + c for c in ascii_chars if c.isalnum()]
    cjk = 0x4E00
    while len(vocab) < num_text_tokens:
        vocab.append(chr(cjk))
        cjk += 1
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    tok.add_special_tokens({"additional_special_tokens": CHATTTS_SPECIAL_TOKENS})
    tok.save_pretrained(str(path))


def _save(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def write_synthetic_assets(root: Path, overrides: dict[str, Any], seed: int = SYNTHETIC_SEED) -> None:
    """Build every ChatTTS component from its real class with seeded random weights."""
    from transformers import LlamaConfig, LlamaModel

    from quantkit import chattts

    chat = new_chat(overrides)
    asset = root / "asset"
    (asset / "gpt").mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):  # the modules draw from torch's shared state: give the caller's back
        torch.manual_seed(seed)
        for stem, module in chattts.random_components(chat).items():
            _save(module, asset / f"{stem}.safetensors")
        # ChatTTS deletes the Llama token embedding after loading (it has its own): keep it tiny.
        llama = LlamaModel(LlamaConfig(**chattts.llama_config(chat), vocab_size=8))
    llama.save_pretrained(str(asset / "gpt"), safe_serialization=True)
    _write_tokenizer(asset / "tokenizer", chattts.config(chat).gpt.num_text_tokens)
    sizes = {f: (root / f).stat().st_size for f in ASSET_FILES}
    (root / OVERRIDES_FILE).write_text(json.dumps({"config": overrides, "seed": seed, "sizes": sizes},
                                                  indent=1))


def _complete(root: Path) -> bool:
    """Every asset present at the size it was written with (a cache truncated by a full disk
    or a killed copy is rebuilt, not reported as damaged forever)."""
    try:
        sizes = json.loads((root / OVERRIDES_FILE).read_text())["sizes"]
        return all((root / f).stat().st_size == sizes[f] for f in ASSET_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# Two threads writing at once would draw each other's weights from torch's shared random state.
_write_lock = threading.Lock()


def synthetic_dir(name: str) -> Path:
    """The cached asset directory of a synthetic source, written on first use (atomically,
    since several evaluation processes may ask for it at once)."""
    target = cache_dir() / "models" / name
    if _complete(target):
        return target
    with _write_lock, cache_writer(target.parent):
        return target if _complete(target) else _write_synthetic(name, target)


def _write_synthetic(name: str, target: Path) -> Path:
    log.info("writing synthetic ChatTTS assets '%s' to %s", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write_synthetic_assets(tmp, SYNTHETIC_CONFIGS[name])
        if _complete(target):  # another process finished first, and may be reading it
            return target
        if target.exists():  # damaged: replace
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error
        if not _complete(target):
            raise write_error(exc, target) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- real weights

def chattts_dir(timeout_s: float = 15.0) -> Path:
    """The official weights: Hugging Face cache first, then a download."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id="2Noise/ChatTTS", local_files_only=True,
                                 allow_patterns=["*.yaml", "*.json", "*.safetensors"])
        return Path(path)
    except Exception:  # noqa: BLE001 - any miss falls through to the download
        pass
    try:
        path = snapshot_download(repo_id="2Noise/ChatTTS",
                                 allow_patterns=["*.yaml", "*.json", "*.safetensors"])
    except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP: all mean "not available"
        raise QuantkitError(
            "the real ChatTTS weights are not in the Hugging Face cache and could not be "
            f"downloaded ({type(exc).__name__}); use --model synthetic for offline work"
        ) from None
    return Path(path)


# ---------------------------------------------------------------- loading

def resolve_source(model: str) -> Path:
    if model == "chattts":
        return chattts_dir()
    if model in SYNTHETIC_CONFIGS:
        return synthetic_dir(model)
    path = Path(model)
    if path.is_dir():
        return path
    raise QuantkitError(
        f"unknown model '{model}' (allowed: {', '.join(SOURCES)}, or a ChatTTS asset directory)")


def check_assets(root: Path) -> None:
    missing = [f for f in ASSET_FILES if not (root / f).is_file()]
    if missing:
        raise QuantkitError(f"model directory {root} is incomplete: missing {', '.join(missing)}")


def read_overrides(root: Path) -> dict[str, Any]:
    """The Config overrides a synthetic asset directory was written with ({} for real weights)."""
    path = Path(root) / OVERRIDES_FILE
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        config = None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise QuantkitError(f"{path} is not a quantkit model configuration "
                            "(expected {\"config\": {section: {key: value}}})")
    return config


def load_chat(model: str = "synthetic-tiny", device: str = "cpu", chattts_compile: bool = False) -> Chat:
    """Load ChatTTS through its own ``Chat._load`` from any model source (``chattts_compile``:
    with ChatTTS's own ``compile=True``, as the stock baseline users start from)."""
    from quantkit import chattts

    dev = resolve_device(device)
    root = resolve_source(model)
    check_assets(root)
    chat = new_chat(read_overrides(root))
    try:
        ok = chattts.load(chat, root, dev, compile=chattts_compile)
    except Exception as exc:  # noqa: BLE001 - safetensors, state-dict and json errors alike
        raise QuantkitError(f"model directory {root} is damaged: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    if not ok:
        raise QuantkitError(f"ChatTTS could not load every component from {root}")
    return chat
