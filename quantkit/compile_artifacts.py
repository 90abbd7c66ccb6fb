"""Saving what compiled decoding compiled, and loading it in a fresh process: the decode step
and prompt pass compiled ahead of time, with their built C++ kernels, or Inductor's cache
artifacts where ahead-of-time compilation fails."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from quantkit.atomic import write_bytes
from quantkit.compile import CompiledGenerate, Precompiled
from quantkit.sampling import Sampling

log = logging.getLogger(__name__)

PRECOMPILED_STEP, PRECOMPILED_PREFILL, INDUCTOR_CACHE = "decode_step.aot", "prefill.aot", "compile_cache.bin"
KERNELS = "inductor"  # the saved functions' C++ kernels, built


def save_compiled(gen: CompiledGenerate, folder: str | Path) -> dict:
    """What this process compiled for ``gen``, into ``folder``: the decode step (ChatTTS's default
    sampling) and the prompt pass compiled ahead of time, or, where that fails (Inductor freezing
    in torch 2.11), Inductor's cache artifacts, which spare code generation but not tracing
    -> a description for load_compiled (file names relative to ``folder``). On CUDA, which
    compiles just in time (CompiledGenerate.ahead), always Inductor's cache artifacts."""
    folder = Path(folder)
    if gen.ahead:
        try:
            sampling = save_precompiled(gen, folder / PRECOMPILED_STEP, folder / PRECOMPILED_PREFILL)
            _build_kernels(folder)
            return {"kind": "aot", "file": PRECOMPILED_STEP, "prefill": PRECOMPILED_PREFILL, "sampling": sampling,
                    "kernels": KERNELS}
        except Exception as exc:  # noqa: BLE001 - an experimental API: any failure means "not here"
            log.warning("ahead-of-time compilation unavailable for this recipe (%s: %s); saving "
                        "Inductor cache artifacts instead", type(exc).__name__, str(exc)[:120])
            for name in (PRECOMPILED_STEP, PRECOMPILED_PREFILL):
                (folder / name).unlink(missing_ok=True)
    save_compile_cache(folder)
    return {"kind": "inductor-cache", "file": INDUCTOR_CACHE}


def _build_kernels(folder: Path) -> None:
    """Build the saved functions' C++ kernels into ``folder/KERNELS`` by loading them once with
    that as Inductor's cache: a saved function carries its kernels' sources, which a fresh
    process would otherwise compile on load (19 for int8-dynamic, about 9 s to build on 2 cores).

    This process compiled the same sources (so the same library names): the folder is seeded
    with the libraries it has loaded, and the load builds only what is missing. The load writes
    the source of every kernel it needs beside its library; seeds left without one are other
    functions' kernels, and go."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    kernels = folder / KERNELS
    seeded = _copy_libraries(kernels)
    with temporary_cache_dir(str(kernels)):
        for name in (PRECOMPILED_STEP, PRECOMPILED_PREFILL):
            _load_aot(folder / name)
    for lib in seeded:
        if not lib.with_suffix(".cpp").exists():
            lib.unlink()
    for lock in [*kernels.rglob("*.lock"), kernels / "locks"]:
        shutil.rmtree(lock) if lock.is_dir() else lock.unlink(missing_ok=True)
    for sub in kernels.iterdir() if kernels.is_dir() else ():
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()


def _copy_libraries(dst: Path) -> list[Path]:
    """Copy the Inductor C++ kernel libraries (``xx/x.so`` with its source ``x.cpp`` beside it)
    that this process has loaded (Linux: its memory map; elsewhere none), from the current or an
    earlier cache folder, to the same places under ``dst`` -> the copies."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    copies = []
    loaded = {Path(fields[5]) for fields in (line.split(None, 5) for line in maps.splitlines())
              if len(fields) == 6 and fields[5].endswith(".so")}
    # Inductor keeps each kernel at CACHE/xx/NAME.so; a process may have loaded it from an earlier
    # cache folder than the current one (the same source: the same name)
    for lib in sorted(p for p in loaded if p.with_suffix(".cpp").is_file() and len(p.parent.name) == 2):
        target = dst / lib.parent.name / lib.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, target)
        copies.append(target)
    return copies


def load_compiled(gen: CompiledGenerate, folder: str | Path, info: dict) -> None:
    """Use what save_compiled wrote (``info``, its description) for the next calls."""
    folder = Path(folder)
    if info["kind"] == "aot":
        if info.get("kernels") and (folder / info["kernels"]).is_dir():
            # Inductor finds a built kernel by its source's hash: copied into this process's
            # cache, loading compiles none (where this machine's compiler flags differ, the
            # hashes do too, and it compiles them as usual).
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            shutil.copytree(folder / info["kernels"], cache_dir(), dirs_exist_ok=True)
        load_precompiled(gen, folder / info["file"], folder / info["prefill"], info["sampling"])
    else:
        load_compile_cache(folder)


def save_compile_cache(directory: str | Path) -> Path | None:
    """Write what Inductor compiled in this process (torch.compiler.save_cache_artifacts)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _info = saved
    path = Path(directory) / INDUCTOR_CACHE
    write_bytes(path, data)
    return path


def save_precompiled(gen: CompiledGenerate, step_path: str | Path, prefill_path: str | Path) -> dict:
    """Save the decode step (for ChatTTS's default sampling) and the prompt pass compiled ahead
    of time (compiling them if this process has not): a fresh process then skips tracing and code
    generation entirely. -> the sampling constants the step bakes in. Raises where ahead-of-time
    compilation fails."""
    s = gen.default_sampling()
    step = gen.precompiled.get(s)
    if not isinstance(step, Precompiled):
        step = gen.precompiled[s] = gen.precompile_step(s)
    first = gen.precompiled_prefill
    if not isinstance(first, Precompiled):
        first = gen.precompiled_prefill = gen.precompile_prefill()
    step.save(step_path)
    first.save(prefill_path)
    return asdict(s)


def load_precompiled(gen: CompiledGenerate, step_path: str | Path, prefill_path: str | Path,
                     sampling: dict) -> None:
    """Use a saved ahead-of-time step for calls whose sampling constants are the saved ones
    (others compile as usual: the loaded function does not check them itself), and the saved
    prompt pass."""
    gen.precompiled[Sampling(**sampling)] = Precompiled(_load_aot(step_path), gen.step)
    gen.precompiled_prefill = Precompiled(_load_aot(prefill_path), gen.prefill)


def _load_aot(path: str | Path) -> Callable:
    with torch._dynamo.config.patch(enable_aot_compile=True), open(path, "rb") as fh:
        return torch.compiler.load_compiled_function(fh)


def load_compile_cache(directory: str | Path) -> bool:
    """Hot-load saved artifacts so the first compile finds its kernels; False if none saved."""
    path = Path(directory) / INDUCTOR_CACHE
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True
