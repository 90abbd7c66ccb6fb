"""Write and load a deployable variant: quantized GPT weights, ChatTTS's other assets, the
recipe, compile artifacts, and a manifest of hashes and versions that loading checks.

Layout of a variant directory::

    manifest.json            schema, recipe, source and its hash, versions, files and sha256
    asset/                   ChatTTS asset layout minus the fp32 GPT weights
    gpt.safetensors|gpt.pt   the GPT after the recipe (torch format where tensor subclasses
                             or packed int8 weights cannot be safetensors)
    decode_step.aot          the decode step compiled ahead of time (compiled recipes),
    prefill.aot              the prompt pass,
    inductor/                their C++ kernels, built; or
    compile_cache.bin        Inductor's cache artifacts where ahead-of-time compilation fails

Loading goes through ChatTTS's own ``Chat._load``; only its one call that reads fp32 GPT
weights (``LlamaModel.from_pretrained``) is answered with the stored, already-quantized GPT.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import glob
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import types
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from quantkit import chattts, trust
from quantkit.atomic import write_error
from quantkit.errors import QuantkitError
from quantkit.quantize import METHODS
from quantkit.recipes import Recipe

if TYPE_CHECKING:
    from ChatTTS import Chat

log = logging.getLogger(__name__)

SCHEMA = 6  # 2: the decode step samples (its saved signature changed); 3: prompt pass saved too;
# 4: the int8 kernel packs its weights in panels (a saved step calls the new layout); 5: the kernel
# library also holds attention and top-p's sort (a saved int8 step calls them); 6: and the fp32
# heads' product
MANIFEST = "manifest.json"
CHECKED_VERSIONS = ("torch", "torchao", "chattts", "transformers", "bitsandbytes")


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in CHECKED_VERSIONS:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_hash(root: Path) -> str:
    from quantkit.models import ASSET_FILES

    h = hashlib.sha256()
    for rel in ASSET_FILES:
        h.update(rel.encode() + sha256(root / rel).encode())
    return h.hexdigest()


def _is_plain(state: dict) -> bool:
    return all(type(v) in (torch.Tensor, nn.Parameter) and not v.is_quantized for v in state.values())


def _write_gpt(chat: Chat, folder: Path) -> str:
    """The applied GPT's state: safetensors for plain tensors, torch's format otherwise."""
    full = chattts.gpt(chat).state_dict()
    state = type(full)((k, v) for k, v in full.items() if not k.startswith("embed_tokens"))
    # quantized modules read their layout version from the metadata on load
    state._metadata = getattr(full, "_metadata", None)
    name = "gpt.safetensors" if _is_plain(state) else "gpt.pt"
    try:
        if name == "gpt.safetensors":
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / name))
        else:
            torch.save(state, folder / name, pickle_module=_enums_by_value)
    except Exception as exc:  # noqa: BLE001 - both writers report a full disk in their own way
        raise write_error(exc, folder / name) from None
    return name


class _EnumsByValuePickler(pickle.Pickler):
    """Enum members pickled as ``Class(value)``: some Pythons (Debian's 3.11.2) pickle them as
    ``getattr(Class, name)``, a global torch's weights-only loader refuses, so a torchao weight's
    enum fields (its kernel preference, its mapping type) would make the variant unloadable."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return type(obj), (obj.value,)
        return NotImplemented


_enums_by_value = types.SimpleNamespace(**{**vars(pickle), "Pickler": _EnumsByValuePickler})


def _copy_assets(src: Path, dst: Path) -> None:
    from quantkit.models import OVERRIDES_FILE

    for item in (src / "asset").rglob("*"):
        rel = item.relative_to(src)
        if item.is_dir() or rel.as_posix() == "asset/gpt/model.safetensors":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, dst / rel)
    if (src / OVERRIDES_FILE).exists():
        shutil.copy2(src / OVERRIDES_FILE, dst / OVERRIDES_FILE)


def _compile_artifacts(chat: Chat, folder: Path, batches: Sequence[int]) -> dict:
    """The compiled step and prompt pass (quantkit.compile_artifacts.save_compiled) for the batch
    buckets of ``batches``, compiled here after a first call, and the int8 kernel they call."""
    from quantkit.compile import compiled_decoding
    from quantkit.compile_artifacts import save_compiled
    from quantkit.shapes import infer_fixed
    from quantkit.synth import synthesize

    synthesize(chat, "Compile.", seed=0, steps=4)
    gen = compiled_decoding(chat)
    info = save_compiled(gen.functions, folder, batches,
                         warm=lambda rows: infer_fixed(chat, ["Compile."] * rows, steps=4, refine_steps=4))
    return {**info, "kernel": _copy_kernel(gen.model, folder)}


KERNEL = "kernels/int8_gemv.so"
# ChatTTS's default split_text runs a text's sentences in batches of up to max_split_batch (4)
SPLIT_BATCHES = (1, 2, 4)


def _copy_kernel(model, folder: Path) -> str | None:
    """The built int8 kernel library, where the compiled step calls it: a fresh process loads
    it instead of compiling it."""
    from quantkit import int8_gemv

    if not any(getattr(m, "packed", False) for m in model.modules()):
        return None
    (folder / KERNEL).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(int8_gemv.library(), folder / KERNEL)
    return KERNEL


def _recipe_and_metrics(recipe: str | None, best: str | None) -> tuple[Any, dict | None]:
    from quantkit.recipes import get_recipe
    from quantkit.report import load_results

    if best is None:
        return get_recipe(recipe), None
    doc = load_results(Path(best))
    name = (doc.get("recommendation") or {}).get("name")
    if not name:
        raise QuantkitError(f"{best}/results.json recommends no recipe")
    chosen = next((r for r in doc["recipes"] if r["name"] == name and r["status"] == "ok"), None)
    if chosen is None:
        raise QuantkitError(f"{best}/results.json recommends '{name}', which it does not list as measured")
    metrics = {k: chosen.get(k) for k in ("ms_per_step", "warm_s_median", "rtf", "weight_bytes",
                                          "error_rate", "fidelity")}
    metrics.update(reason=doc["recommendation"].get("reason"), model=doc.get("model"), device=doc.get("device"))
    # a recipe given to eval as a .toml path is exported from that file
    source = chosen.get("source") if isinstance(chosen.get("source"), str) else name
    rec = get_recipe(source)
    if rec.name != name:
        raise QuantkitError(f"{best}/results.json: recipe '{name}' came from {source}, which now "
                            f"holds '{rec.name}'")
    return rec, metrics


def export_variant(out: str | Path, recipe: str | None = None, best: str | None = None,
                   model: str | None = None, device: str | None = None, force: bool = False,
                   batches: Sequence[int] | None = None) -> dict[str, Any]:
    """Write a variant directory: into a temporary sibling, renamed into place at the very end.
    A compiled recipe's variant carries its decode step, text step and prompt pass for one row and
    for the batch buckets of ``batches`` (default: those of ChatTTS's default call,
    SPLIT_BATCHES): calls of those sizes compile nothing in a fresh process. ``model`` and
    ``device`` default to the eval's with ``best``, else to synthetic on the CPU."""
    from quantkit.apply import apply_recipe, weight_bytes
    from quantkit.models import load_chat, resolve_device, resolve_source

    out = Path(out).absolute()
    check_export_target(out, force)
    rec, metrics = _recipe_and_metrics(recipe, best)
    model, device = _model_and_device(model, device, metrics)
    if batches is None:
        batches = SPLIT_BATCHES if rec.compile.enabled else (1,)
    _check_exportable(rec, resolve_device(device), batches)
    src = resolve_source(model)
    chat = load_chat(model, device)
    apply_recipe(chat, rec)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}.", dir=out.parent))
    try:
        _copy_assets(src, tmp)
        gpt_file = _write_gpt(chat, tmp)
        compiled = _compile_artifacts(chat, tmp, batches) if rec.compile.enabled else None
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "schema": SCHEMA, "recipe": rec.to_dict(),
            "source": {"model": model, "sha256": _source_hash(src)},
            "versions": _versions(), "device": torch.device(chat.device).type,
            "gpt_weights": {"file": gpt_file,
                            "format": "safetensors" if gpt_file.endswith(".safetensors") else "torch"},
            "compile_artifacts": compiled,
            "weight_bytes": asdict(weight_bytes(chat)),
            "chosen_by": metrics,
            "files": {f: sha256(tmp / f) for f in files},
        }
        _write_manifest(tmp, manifest)
        trust.record(tmp / MANIFEST)
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {"total_bytes": sum((out / f).stat().st_size for f in files),
             "gpt_bytes": (out / gpt_file).stat().st_size}
    return {"out": str(out), "recipe": rec.name, **sizes, "compile_artifacts": bool(compiled)}


def _model_and_device(model: str | None, device: str | None, metrics: dict | None) -> tuple[str, str]:
    """What to export: as given, else what the eval that chose the recipe measured; a model other
    than the eval's is said, since its recommendation was made on other weights."""
    evaluated = metrics or {}
    chosen = (model or evaluated.get("model") or "synthetic", device or evaluated.get("device") or "cpu")
    if evaluated.get("model") and chosen[0] != evaluated["model"]:
        log.warning("exporting model '%s' with the recipe an eval of model '%s' recommended", chosen[0],
                    evaluated["model"])
    return chosen


def _check_exportable(rec: Recipe, device: torch.device, batches: Sequence[int]) -> None:
    """Refuse, before loading anything, a recipe whose variant could not hold what it applies."""
    from quantkit.apply import check_runnable

    if rec.baseline:
        raise QuantkitError("the 'stock' baseline changes nothing: export fp32 or a quantized recipe")
    others = [c for c in ("heads", "decoder", "vocos") if rec.component(c).quantize != "none"]
    if others:
        # only the GPT's applied state is stored; the rest is re-applied from ChatTTS's assets,
        # which for a cast is exact and cheap but for quantization would redo it from fp32
        raise QuantkitError(f"recipe '{rec.name}': exporting quantized {', '.join(others)} is not "
                            "supported (only the GPT's quantized weights are stored)")
    method = METHODS.get(rec.gpt.quantize)
    if method is not None and method.not_exportable:
        raise QuantkitError(f"recipe '{rec.name}': {method.not_exportable}")
    check_runnable(rec, device)
    if set(batches) - {1} and not rec.compile.enabled:
        raise QuantkitError(f"recipe '{rec.name}' is not compiled: its variant carries no compiled "
                            "step, for batches or otherwise")


def check_export_target(out: Path, force: bool) -> None:
    """Refuse, before any work, a target export must not touch: ``--force`` replaces only a
    quantkit variant (every file in it listed in its manifest) or an empty folder."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise QuantkitError(f"{out} exists and is not a directory: export writes a directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise QuantkitError(f"cannot write {out}: {parent} is not a writable directory")
    if not out.exists():
        return
    if not force:
        raise QuantkitError(f"{out} already exists (use --force to replace the variant in it)")
    if any(out.iterdir()) and not _is_variant(out):
        raise QuantkitError(f"{out} is not a quantkit variant: --force replaces only a variant "
                            "or an empty folder, never other files")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise QuantkitError(f"{out} is the current directory or holds it: export from elsewhere")


def _is_variant(folder: Path) -> bool:
    """True if ``folder`` holds a manifest and exactly the files it lists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _present_files(folder) == listed


def _present_files(folder: Path) -> set[str]:
    """Every entry under ``folder`` that is not a directory (links included), but the manifest."""
    found = set()
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(Path(root, name).relative_to(folder).as_posix())
    return found - {MANIFEST}


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.export-"


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders of exports to the same place whose process is gone (killed)."""
    prefix = _temp_prefix(out)
    for tmp in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = tmp.name[len(prefix):].split(".")[0]
        if tmp.is_dir() and not tmp.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            log.warning("removing %s, left by an interrupted export", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """New in, old aside, old deleted: a crash at any point leaves a whole variant under ``out``
    or beside it, never neither. Without ``force`` the rename fails if ``out`` appeared since
    the start (another export won the race)."""
    aside = None
    if force and out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}.old.", dir=out.parent))
        os.rename(out, aside / "variant")
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        if aside is not None:
            os.rename(aside / "variant", out)
            aside.rmdir()
        raise QuantkitError(f"{out} appeared while exporting (another export?): left as it is") from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError if ``dst`` exists, even an empty folder."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # not glibc >= 2.28: check, then rename (a window remains)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)
        return
    at_fdcwd, rename_noreplace_flag = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace_flag) != 0:
        err = ctypes.get_errno()
        raise FileExistsError(err, os.strerror(err), str(dst)) if err == errno.EEXIST else OSError(
            err, os.strerror(err), str(dst))


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


# ---------------------------------------------------------------- loading

def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise QuantkitError(f"{folder} is not a quantkit variant (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantkitError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise QuantkitError(f"{path}: unsupported manifest schema {found!r} (this quantkit reads {SCHEMA})")
    for key in ("recipe", "files", "versions", "gpt_weights"):
        if key not in manifest:
            raise QuantkitError(f"{path}: missing '{key}'")
    if not isinstance(manifest["recipe"], dict) or not isinstance(manifest["recipe"].get("name"), str):
        raise QuantkitError(f"{path}: 'recipe' is malformed")
    return manifest


def verify(folder: Path, manifest: dict) -> None:
    """The manifest lists every file present, each inside the folder, none a link, each
    unchanged; the files it names are among them; the library versions are the running ones."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()):
        raise QuantkitError(f"variant {folder}: the manifest's file list is empty or malformed")
    for rel in files:
        _inside(folder, rel)
    present = _present_files(folder)
    links = sorted(r for r in present if (folder / r).is_symlink())
    if links:
        raise QuantkitError(f"variant {folder}: {links[0]} is a symbolic link (refused)")
    unlisted = sorted(present - set(files))
    if unlisted:
        raise QuantkitError(f"variant {folder}: {unlisted[0]} is not listed in the manifest (refused)")
    for rel in _named_files(manifest):
        if rel not in files and not any(f.startswith(rel.rstrip("/") + "/") for f in files):
            raise QuantkitError(f"variant {folder}: the manifest names {rel!r}, which it does not list")
    for rel, digest in files.items():
        path = folder / rel
        if not path.is_file():
            raise QuantkitError(f"variant {folder} is missing {rel}")
        if sha256(path) != digest:
            raise QuantkitError(f"variant {folder}: {rel} does not match its hash in the manifest "
                                "(corrupted or edited)")
    current = _versions()
    versions = manifest["versions"] if isinstance(manifest["versions"], dict) else {}
    diff = [f"{k} {v} (running {current.get(k)})" for k, v in versions.items() if current.get(k) != v]
    if diff:
        raise QuantkitError(f"variant {folder} was exported with {', '.join(diff)}: re-export it "
                            "with the installed libraries")


def _inside(folder: Path, rel: str) -> Path:
    """``folder/rel`` for a plain relative path that stays inside ``folder``."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise QuantkitError(f"variant {folder}: the manifest lists {rel!r}, a path outside the variant")
    return folder / rel


def _named_files(manifest: dict) -> list[str]:
    """Paths the manifest's other fields point to (weights, compiled code, kernels)."""
    from quantkit.compile_artifacts import SAVED, saved_files

    weights = manifest.get("gpt_weights")
    artifacts = manifest.get("compile_artifacts") or {}
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) or not isinstance(artifacts, dict):
        raise QuantkitError("the variant's manifest is malformed (gpt_weights, compile_artifacts)")
    buckets = artifacts.get("batch_buckets", [])
    if not isinstance(buckets, list) or not all(isinstance(b, dict) and isinstance(b.get("rows"), int)
                                                for b in buckets):
        raise QuantkitError("the variant's manifest is malformed (compile_artifacts.batch_buckets)")
    named = [weights["file"]] + [artifacts[k] for k in (*SAVED, "kernel", "kernels")
                                 if artifacts.get(k) is not None]
    named += [f for b in buckets for f in saved_files(b)]
    if not all(isinstance(n, str) for n in named):
        raise QuantkitError("the variant's manifest is malformed (file names must be strings)")
    return named


@contextlib.contextmanager
def _stored_gpt(folder: Path, manifest: dict):
    """Answer ChatTTS's ``LlamaModel.from_pretrained`` with the stored (quantized) GPT."""
    from transformers import LlamaConfig, LlamaModel

    weights = manifest["gpt_weights"]

    def from_pretrained(gpt_folder, *args, **kwargs):
        config = LlamaConfig.from_pretrained(gpt_folder)
        with torch.device("meta"):
            model = LlamaModel(config)
        model.embed_tokens = nn.Embedding(1, config.hidden_size)  # ChatTTS deletes it next
        path = folder / weights["file"]
        if weights["format"] == "safetensors":
            from safetensors.torch import load_file

            state, materialized = load_file(str(path)), False
        else:
            prepare = getattr(METHODS.get(manifest["recipe"]["gpt"]["quantize"]), "prepare_skeleton", None)
            materialized = prepare is not None
            if prepare is not None:
                prepare(model)
            state = torch.load(path, weights_only=True)  # tensors only: nothing is unpickled as code
        # meta skeletons take the stored tensors as they are (torchao subclasses included)
        model.load_state_dict(state, strict=False, assign=not materialized)
        # inv_freq is a non-persistent buffer: rebuild it as LlamaModel's constructor does
        model.rotary_emb = type(model.rotary_emb)(config=config)
        missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                   if t.is_meta]
        if missing:
            raise QuantkitError(f"variant {folder}: {weights['file']} lacks {missing[0]}")
        return model.eval()

    with chattts.StoredGPT(from_pretrained):
        yield


def load_variant(folder: str | Path, device: str = "cpu", trust_compiled: bool = False) -> Chat:
    """A ready ChatTTS ``Chat`` from an exported variant (checked, not re-quantized). Its
    compiled code loads only if this machine exported it or ``trust_compiled``; otherwise the
    recipe compiles just in time."""
    from quantkit.apply import apply_recipe
    from quantkit.models import new_chat, read_overrides, resolve_device
    from quantkit.recipes import parse_recipe

    folder = Path(folder)
    manifest = read_manifest(folder)
    verify(folder, manifest)
    dev = resolve_device(device)
    recipe_data = dict(manifest["recipe"])
    recipe = parse_recipe(recipe_data.pop("name"), recipe_data, where=f"{folder}/{MANIFEST}")
    chat = new_chat(read_overrides(folder))
    try:
        with _stored_gpt(folder, manifest):
            chattts.load(chat, folder, dev)
    except QuantkitError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise QuantkitError(f"variant {folder} could not be loaded: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    artifacts = manifest.get("compile_artifacts")
    if artifacts and not (trust_compiled or trust.is_trusted(folder / MANIFEST)):
        log.warning("variant %s was not exported on this machine: its compiled code is not "
                    "loaded (pass --trust-compiled / trust_compiled=True if you trust its origin); "
                    "compiling just in time instead", folder)
        artifacts = None
    if artifacts and artifacts.get("kernel"):
        from quantkit import int8_gemv

        if not int8_gemv.load_library(folder / artifacts["kernel"]):
            raise QuantkitError(f"variant {folder} was compiled for CPUs with AVX512-VNNI, which this "
                                "one lacks: export it again here")
    apply_recipe(chat, recipe, preapplied=("gpt",))
    if artifacts:
        from quantkit.compile import compiled_decoding
        from quantkit.compile_artifacts import load_compiled

        load_compiled(compiled_decoding(chat).functions, folder, artifacts)
    # ChatTTS's text normalizer JIT-compiles numba functions on its first texts (as long as an
    # int8 variant's whole first synthesis): a loaded variant is ready.
    chattts.warm_normalizer(chat)
    return chat
