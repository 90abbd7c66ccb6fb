"""The compiled functions of compiled decoding, and where they come from: the decode step,
text step and prompt pass of one static-cache model, compiled just in time, or ahead of time
where that works (CPU), and saved to a folder (with their built C++ kernels, or Inductor's cache
artifacts where ahead-of-time compilation fails) so that a fresh process skips tracing and code
generation."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from quantkit.atomic import atomic_path, write_bytes
from quantkit.generate import bucket, decode_step, decode_text_step, prefill, prompt_inputs
from quantkit.inductor import compile_kwargs, holds_torchao_weights
from quantkit.recipes import CompileSettings
from quantkit.sampling import Sampling

log = logging.getLogger(__name__)

PRECOMPILED_STEP, PRECOMPILED_PREFILL, INDUCTOR_CACHE = "decode_step.aot", "prefill.aot", "compile_cache.bin"
PRECOMPILED_TEXT_STEP = "text_step.aot"
SAVED = ("file", "prefill", "text_step")  # a batch bucket's saved functions: decode step, prompt pass, text step
KERNELS = "inductor"  # the saved functions' C++ kernels, built


class CompiledFunctions:
    """The functions ``quantkit.generate`` runs for one StaticCacheGPT: just-in-time compiled (or
    eager, with ``compile_step`` off), and on CPU the decode and text steps (per Sampling) and the
    prompt pass compiled ahead of time at first use for each cache shape, so that what export and
    ``apply --compile-cache`` save is what ran. CUDA keeps just-in-time compilation: CUDA graphs
    are untested ahead of time; so do recipes with Inductor freezing."""

    def __init__(self, model, settings: CompileSettings, default: Sampling, compile_step: bool = True,
                 text_default: Sampling | None = None):
        self.model, self.settings, self.default, self.text_default = model, settings, default, text_default
        self.torchao = holds_torchao_weights(model)
        self.step = self.compile_step() if compile_step else decode_step
        self.text_step = self.compile_step(decode_text_step) if compile_step else decode_text_step
        self.prefill = self.compile_prefill() if compile_step else prefill
        # Frozen code cannot be saved ahead of time in torch 2.11 (not an OutputCode): trying
        # would compile every shape twice, and fail
        self.ahead = compile_step and model.slots.device.type == "cpu" and not settings.freezing
        self.precompiled: dict[Sampling, Callable] = {}  # ahead-of-time decode steps
        self.precompiled_text: dict[Sampling, Callable] = {}  # and text steps
        self.precompiled_prefill: PerCacheShape | None = None

    def step_for(self, s: Sampling, text: bool = False) -> Callable:
        """The decode step to run with sampling ``s`` (text refinement's with ``text``)."""
        table, fallback = (self.precompiled_text, self.text_step) if text else (self.precompiled, self.step)
        if s not in table and self.ahead:
            table[s] = PerCacheShape(self.model, lambda: self.precompile_step(s, text), fallback)
        return table.get(s, fallback)

    def prefill_fn(self) -> Callable:
        if self.precompiled_prefill is None and self.ahead:
            self.precompiled_prefill = PerCacheShape(self.model, self.precompile_prefill, self.prefill)
        return self.precompiled_prefill or self.prefill

    def precompile_step(self, s: Sampling, text: bool = False) -> "Precompiled":
        """The decode step (text refinement's with ``text``) for sampling ``s`` compiled ahead of
        time for the cache's current shape (raises where that fails)."""
        if text:
            self.model.head_text.fold()  # folded at a call's first token: before tracing, here
        step, fallback = (decode_text_step, self.text_step) if text else (decode_step, self.step)
        return Precompiled(_aot(lambda: self.compile_step(step), self.example_inputs(s, text)), fallback)

    def precompile_prefill(self) -> "Precompiled":
        """The prompt pass compiled ahead of time for the cache's current shape (raises where that
        fails)."""
        return Precompiled(_aot(self.compile_prefill, self.example_prompt()), self.prefill)

    def compile_step(self, step: Callable = decode_step) -> Callable:
        kwargs = compile_kwargs(self.settings, torchao=self.torchao)
        return torch.compile(step, fullgraph=True, dynamic=False, **kwargs)

    def compile_prefill(self) -> Callable:
        """The prompt pass, compiled: eagerly, its ~30 small operations per layer around the int8
        products cost more than the products. Never as CUDA graphs: one graph would be recorded
        per prompt length."""
        kwargs = compile_kwargs(self.settings, cuda_graphs=False, torchao=self.torchao)
        return torch.compile(prefill, fullgraph=True, dynamic=False, **kwargs)

    def example_inputs(self, s: Sampling, text: bool = False) -> tuple:
        """decode_step's (or with ``text`` decode_text_step's) arguments for compiling it ahead of
        time: the cache's current rows."""
        model, rows, device = self.model, self.model.rows, self.model.slots.device
        width, vocab = (1, model.emb_text.num_embeddings) if text else (len(model.emb_code), model.code_vocab)
        keys = model.slots[:2]
        torch._dynamo.mark_dynamic(keys, 0)
        return (model, torch.zeros(rows, width, dtype=torch.long, device=device), keys,
                torch.ones(rows, 1, dtype=torch.long, device=device),
                torch.zeros(rows, dtype=torch.long, device=device),
                torch.full((rows * width, s.past_window), -1, dtype=torch.long, device=device),
                torch.ones(rows * width, 1, device=device), torch.tensor(False, device=device),
                torch.ones(rows * width, vocab, device=device), s)

    def example_prompt(self) -> tuple:
        """prefill's arguments for compiling it ahead of time (any prompt length from 2)."""
        model, rows = self.model, self.model.rows
        with torch.inference_mode():
            emb = torch.zeros(rows, 2, model.llama.config.hidden_size, device=model.slots.device)
        pad = torch.zeros(rows, dtype=torch.long, device=model.slots.device)
        return prompt_inputs(model, emb, pad, mark=torch._dynamo.mark_dynamic)


class Precompiled:
    """An ahead-of-time compiled function, and what runs instead where a call fails its guards
    (where a just-in-time one would recompile): a one-token prompt, for one, against the saved
    prompt pass traced for two or more. The guards are checked here, as the function would check
    them itself, but a failure costs no exception and no explanation of which guard failed."""

    def __init__(self, fn: Callable, fallback: Callable):
        self.fn, self.fallback = fn, fallback
        fn.disable_guard_check()

    def __call__(self, *args):
        if self.fn.guard_check(*args):
            return self.fn(*args)
        log.debug("these inputs fail the precompiled function's guards; running it just in time")
        return self.fallback(*args)

    def save(self, path: str | Path) -> None:
        self.fn.save_compiled_function(str(path))


class PerCacheShape:
    """A function compiled ahead of time for each shape of the model's cache (batch bucket,
    capacity) at its first use there: a step compiled for one shape fails its guards on another,
    and the just-in-time path it would then take costs a guard check per cached graph per step."""

    def __init__(self, model, precompile: Callable[[], Precompiled], fallback: Callable):
        self.model, self.precompile, self.fallback = model, precompile, fallback
        self.by_shape: dict[tuple[int, int], Callable] = {}

    def shape(self) -> tuple[int, int]:
        return self.model.rows, self.model.capacity

    def __call__(self, *args):
        fn = self.by_shape.get(self.shape())
        if fn is None:
            fn = self.by_shape[self.shape()] = _or_just_in_time(self.precompile, self.fallback)
        return fn(*args)

    def current(self) -> Precompiled:
        """The function for the cache's current shape, compiled ahead of time now if it was not
        (raises where that fails)."""
        fn = self.by_shape.get(self.shape())
        if not isinstance(fn, Precompiled):
            fn = self.by_shape[self.shape()] = self.precompile()
        return fn


def _or_just_in_time(precompile: Callable[[], Precompiled], fallback: Callable) -> Callable:
    """``precompile()``, or ``fallback`` where ahead-of-time compilation fails."""
    try:
        return precompile()
    except Exception as exc:  # noqa: BLE001 - an experimental API
        log.warning("ahead-of-time compilation failed (%s: %s); compiling just in time",
                    type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return fallback


@contextmanager
def _ahead_of_time():
    from torch._dynamo.convert_frame import compile_lock

    # Dynamo's just-in-time compiles take its lock, ahead-of-time ones do not: two at once (a Chat
    # per thread) break each other's tracing, and one thread's end of the setting would end the
    # other's. The setting is scoped: left on, it changes what later just-in-time compiles cache.
    with compile_lock, torch._dynamo.config.patch(enable_aot_compile=True):
        yield


def _aot(compile_fn: Callable[[], Callable], example: tuple):
    with _ahead_of_time(), torch.no_grad():
        return compile_fn().aot_compile((example, {}))


def save_compiled(fns: CompiledFunctions, folder: str | Path, batches: Sequence[int] = (1,),
                  warm: Callable[[int], object] | None = None) -> dict:
    """What this process compiled for ``fns``, into ``folder``: the decode step (ChatTTS's default
    sampling) and the prompt pass compiled ahead of time for the batch buckets of ``batches``, or,
    where this process compiles just in time (CompiledFunctions.ahead: CUDA, Inductor freezing) or
    that fails, Inductor's cache artifacts, which spare code generation but not tracing -> a
    description for load_compiled (file names relative to ``folder``). Those hold only what this
    process compiled: before they are written, ``warm(rows)`` runs each batch bucket (text
    refinement's step included)."""
    folder = Path(folder)
    if fns.ahead:
        try:
            sampling, text_sampling, saved = save_precompiled(fns, folder, batches)
            _build_kernels(folder, [folder / f for b in saved for f in saved_files(b)])
            one_row = {k: v for k, v in saved[0].items() if k != "rows"}
            return {"kind": "aot", **one_row, "sampling": sampling, "text_sampling": text_sampling,
                    "kernels": KERNELS, "batch_buckets": saved[1:]}
        except Exception as exc:  # noqa: BLE001 - an experimental API: any failure means "not here"
            log.warning("ahead-of-time compilation unavailable for this recipe (%s: %s); saving "
                        "Inductor cache artifacts instead", type(exc).__name__, str(exc)[:120])
            for rows in buckets(batches):
                for name in _files(rows).values():
                    (folder / name).unlink(missing_ok=True)
    if warm is not None:
        for rows in buckets(batches):
            warm(rows)
    save_compile_cache(folder)
    return {"kind": "inductor-cache", "file": INDUCTOR_CACHE}


def _build_kernels(folder: Path, saved: list[Path]) -> None:
    """Build the ``saved`` functions' C++ kernels into ``folder/KERNELS`` by loading them once with
    that as Inductor's cache: a saved function carries its kernels' sources, which a fresh
    process would otherwise compile on load (seconds of a cold start).

    This process compiled the same sources (so the same library names): the folder is seeded
    with the libraries it has loaded, and the load builds only what is missing. The load writes
    the source of every kernel it needs beside its library; seeds left without one are other
    functions' kernels, and go."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    kernels = folder / KERNELS
    seeded = _copy_libraries(kernels)
    with temporary_cache_dir(str(kernels)):
        for path in saved:
            _load_aot(path)
    for lib in seeded:
        if not lib.with_suffix(".cpp").exists():
            lib.unlink()
    for lock in [*kernels.rglob("*.lock"), kernels / "locks"]:
        shutil.rmtree(lock) if lock.is_dir() else lock.unlink(missing_ok=True)
    for sub in kernels.iterdir() if kernels.is_dir() else ():
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()


def _add_missing(src: Path, dst: Path) -> None:
    """Copy into ``dst`` the files under ``src`` that it lacks, each renamed into place whole.
    Inductor's cache is shared: a present library may be loaded by another process, and a copy
    over it in place would rewrite the pages it runs from."""
    for item in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / item.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copy2(item, tmp)


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


def load_compiled(fns: CompiledFunctions, folder: str | Path, info: dict) -> None:
    """Use what save_compiled wrote (``info``, its description) for the next calls."""
    folder = Path(folder)
    if info["kind"] == "aot":
        if info.get("kernels") and (folder / info["kernels"]).is_dir():
            # Inductor finds a built kernel by its source's hash: copied into this process's
            # cache, loading compiles none (where this machine's compiler flags differ, the
            # hashes do too, and it compiles them as usual).
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            _add_missing(folder / info["kernels"], Path(cache_dir()))
        one_row = {k: info[k] for k in SAVED if k in info}
        saved = [{"rows": 1, **one_row}, *info.get("batch_buckets", [])]
        load_precompiled(fns, folder, saved, info["sampling"], info.get("text_sampling"))
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


def save_precompiled(fns: CompiledFunctions, folder: Path,
                     batches: Sequence[int] = (1,)) -> tuple[dict, dict | None, list[dict]]:
    """Save the decode step and the text step (for ChatTTS's default sampling and refinement's)
    and the prompt pass compiled ahead of time for each batch bucket of ``batches`` (one row
    always) at the recipe's capacity, the shapes a fresh process's calls start on (compiling them
    if this process has not): such calls, text refinement included, then skip tracing and code
    generation entirely. -> the sampling constants the steps bake in, and per bucket its rows and
    files (one row's first). Raises where ahead-of-time compilation fails."""
    s, text, saved = fns.default, fns.text_default, []
    for rows in buckets(batches):
        fns.model.reserve(rows, 1, fresh=True)
        names = _files(rows, text is not None)
        fns.step_for(s).current().save(folder / names["file"])
        fns.prefill_fn().current().save(folder / names["prefill"])
        if text is not None:
            fns.step_for(text, text=True).current().save(folder / names["text_step"])
        saved.append({"rows": rows, **names})
    fns.model.reserve(1, 1, fresh=True)
    return asdict(s), asdict(text) if text is not None else None, saved


def buckets(batches: Sequence[int]) -> list[int]:
    """The batch buckets (rows) that calls of these batch sizes run in, one row always."""
    return sorted({1, *map(bucket, batches)})


def _files(rows: int, text: bool = True) -> dict[str, str]:
    """The saved decode step's, prompt pass's and text step's file names for a batch bucket."""
    names = dict(zip(SAVED, (PRECOMPILED_STEP, PRECOMPILED_PREFILL, PRECOMPILED_TEXT_STEP)))
    if rows > 1:
        names = {k: name.replace(".aot", f"-{rows}.aot") for k, name in names.items()}
    return names if text else {k: v for k, v in names.items() if k != "text_step"}


def saved_files(bucket_info: dict) -> list[str | None]:
    """The files one bucket's entry names (None where one it needs is missing; no text step in a
    variant exported before it was saved)."""
    return [bucket_info.get(k) for k in SAVED if k != "text_step" or k in bucket_info]


def load_precompiled(fns: CompiledFunctions, folder: Path, saved: list[dict], sampling: dict,
                     text_sampling: dict | None = None) -> None:
    """Use the saved ahead-of-time steps and prompt passes, each for the shape it was saved for
    (its rows at the recipe's capacity), the steps for calls whose sampling constants are the
    saved ones (others compile as usual: the loaded function does not check them itself)."""
    # The largest bucket's cache made now, not at its first call; smaller calls use its first rows
    fns.model.reserve(max(b["rows"] for b in saved), 1, fresh=True)
    fns.model.reserve(1, 1, fresh=True)
    step, first = fns.step_for(Sampling(**sampling)), fns.prefill_fn()
    text = fns.step_for(Sampling(**text_sampling), text=True) if text_sampling is not None else None
    for b in saved:
        shape = (b["rows"], fns.model.capacity)
        step.by_shape[shape] = Precompiled(_load_aot(folder / b["file"]), fns.step)
        first.by_shape[shape] = Precompiled(_load_aot(folder / b["prefill"]), fns.prefill)
        if text is not None and "text_step" in b:
            text.by_shape[shape] = Precompiled(_load_aot(folder / b["text_step"]), fns.text_step)


def _load_aot(path: str | Path) -> Callable:
    with _ahead_of_time(), open(path, "rb") as fh:
        return torch.compiler.load_compiled_function(fh)


def load_compile_cache(directory: str | Path) -> bool:
    """Hot-load saved artifacts so the first compile finds its kernels; False if none saved."""
    path = Path(directory) / INDUCTOR_CACHE
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    return True
