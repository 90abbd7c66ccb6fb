"""One recipe, one process: load, apply, first call, warm calls; the numbers `apply` prints
and `eval` collects."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit import trust
from quantkit.apply import apply_recipe, check_runnable, weight_bytes
from quantkit.atomic import check_writable_target, write_text
from quantkit.audio import write_wav
from quantkit.chattts import check_steps
from quantkit.errors import QuantkitError
from quantkit.machine import process_seconds
from quantkit.models import load_chat, resolve_device
from quantkit.recipes import Recipe, get_recipe
from quantkit.synth import SAMPLE_RATE, synthesize

if TYPE_CHECKING:
    from ChatTTS import Chat

log = logging.getLogger(__name__)


def run_recipe(recipe_name: str, model: str = "synthetic", device: str = "cpu",
               text: str = "", seed: int = 0, steps: int | None = None,
               max_new_tokens: int = 2048, out_wav: str | None = None,
               compile_cache: str | None = None, trust_compiled: bool = False) -> dict[str, Any]:
    recipe = get_recipe(recipe_name)  # validate before the slow load
    check_runnable(recipe, resolve_device(device))
    check_steps(steps)
    if out_wav:
        check_writable_target(out_wav)
    if compile_cache and recipe.compile.enabled:
        check_compile_cache(Path(compile_cache))
    import ChatTTS  # noqa: F401 - import time (transformers, numba) is not load time

    t0 = time.perf_counter()
    chat = load_chat(model, device)
    t1 = time.perf_counter()
    apply_recipe(chat, recipe)
    cache_state, key = None, cache_key(recipe, model)
    if compile_cache and recipe.compile.enabled:
        cache_state = "loaded" if _load_compiled(chat, key, Path(compile_cache), trust_compiled) else "saved"
    t2 = time.perf_counter()
    first = synthesize(chat, text, seed=seed, steps=steps, max_new_tokens=max_new_tokens)
    first_audio_since_start = process_seconds()
    if cache_state == "saved":
        _save_compiled(chat, key, Path(compile_cache))
    warm = synthesize(chat, text, seed=seed, steps=steps, max_new_tokens=max_new_tokens)
    if out_wav:
        write_wav(out_wav, warm.wav, SAMPLE_RATE)
    return {
        "recipe": recipe.name,
        "model": model,
        "device": str(chat.device),
        "load_s": t1 - t0,
        "apply_s": t2 - t1,
        "first_call_s": first.total_s,
        "warm_s": warm.total_s,
        "steps": warm.steps,
        "ms_per_step": 1000.0 * warm.gpt_s / max(warm.steps, 1),
        # compiled decoding times its decode steps alone (no prompt pass): None for ChatTTS's loop
        "step_ms": 1000.0 * warm.step_s if warm.step_s else None,
        "rtf": warm.total_s / max(warm.audio_s, 1e-9),
        "weight_bytes": weight_bytes(chat).total,
        "wav": out_wav,
        # first_call_s includes compilation: with a loaded cache it is the cold start a user sees
        "compile_cache": cache_state,
        "first_audio_since_process_start_s": first_audio_since_start,
    }


COMPILED_INFO = "compiled.json"


def cache_key(recipe: Recipe, model: str) -> dict:
    """What saved compilations are for: the recipe's settings, the model and the layout of what
    compiled code calls (export's schema), as JSON reads back."""
    from quantkit.export import SCHEMA

    return json.loads(json.dumps({"recipe": recipe.to_dict(), "model": model, "schema": SCHEMA}))


def check_compile_cache(folder: Path) -> None:
    """A compile cache is saved only into a new or empty directory, or one quantkit saved into
    (it holds COMPILED_INFO): its files are hashed, and replaced, as quantkit's own."""
    if folder.exists() and not folder.is_dir():
        raise QuantkitError(f"--compile-cache {folder} is not a directory")
    if folder.is_dir() and not (folder / COMPILED_INFO).is_file() and any(folder.iterdir()):
        raise QuantkitError(f"--compile-cache {folder} holds files quantkit did not write (it has no "
                            f"{COMPILED_INFO}): give a new or empty directory")


def _load_compiled(chat: Chat, key: dict, folder: Path, trust_compiled: bool) -> bool:
    """Load what an earlier run saved in ``folder`` for the same recipe and model; False if
    there is none, or it is not trusted (then the recipe compiles just in time)."""
    from quantkit.compile import compiled_decoding
    from quantkit.compile_artifacts import load_compiled
    from quantkit.export import sha256

    try:
        info = json.loads((folder / COMPILED_INFO).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("for") != key:  # another recipe's: compile, replace
        return False
    if not (trust_compiled or trust.is_trusted(folder / COMPILED_INFO)):
        log.warning("compile cache %s was not written on this machine: its compiled code is not "
                    "loaded (pass --trust-compiled if you trust its origin); compiling just in time",
                    folder)
        return False
    files = info.get("files")
    if not isinstance(files, dict) or not files or any(
            not (folder / rel).is_file() or (folder / rel).is_symlink() or sha256(folder / rel) != digest
            for rel, digest in files.items()):
        raise QuantkitError(f"compile cache {folder} is damaged (a file is missing or changed); "
                            "delete it or give another directory")
    try:
        load_compiled(compiled_decoding(chat).functions, folder, info)
    except Exception as exc:  # noqa: BLE001 - pickles of compiled functions fail in many ways
        raise QuantkitError(f"compile cache {folder} could not be loaded ({type(exc).__name__}); "
                            "delete it or give another directory") from None
    return True


def _save_compiled(chat: Chat, key: dict, folder: Path) -> None:
    from quantkit.compile import compiled_decoding
    from quantkit.compile_artifacts import save_compiled
    from quantkit.export import sha256

    folder.mkdir(parents=True, exist_ok=True)
    # Marks the folder quantkit's while the files are written, and names none of them until the last write.
    write_text(folder / COMPILED_INFO, json.dumps({"saving": True}))
    info = save_compiled(compiled_decoding(chat).functions, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPILED_INFO)
    info["files"] = {p.relative_to(folder).as_posix(): sha256(p) for p in files}
    write_text(folder / COMPILED_INFO, json.dumps({**info, "for": key}, indent=1))
    trust.record(folder / COMPILED_INFO)
