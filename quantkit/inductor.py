"""Torch-wide compiler settings, in one place and applied explicitly where quantkit compiles:
Inductor's options for a recipe, CUDA graphs or not, its vector-ISA probe remembered per
machine, and tracing's CUDA device guard kept alive for compiles in other threads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
import threading

import torch

from quantkit.atomic import write_text
from quantkit.cache import cache_dir
from quantkit.quiet import import_cpp_extension
from quantkit.recipes import CompileSettings


def for_device(settings: CompileSettings, device: torch.device) -> CompileSettings:
    """The settings with mode "auto" made concrete: CUDA graphs on CUDA, Inductor's default
    elsewhere."""
    if settings.mode != "auto":
        return settings
    return dataclasses.replace(settings, mode="reduce-overhead" if device.type == "cuda" else "default")


def uses_cuda_graphs(settings: CompileSettings, device: torch.device) -> bool:
    from torch._inductor import list_mode_options

    return device.type == "cuda" and bool(list_mode_options(settings.mode).get("triton.cudagraphs"))


# What torchao's quantize_ sets process-wide by default (its configs' set_inductor_config), set
# here per compile instead: a process that loads the quantized weights (an exported variant)
# then compiles with the same options, so Inductor's saved cache keys match, and the options do
# not leak into other recipes' compiles in the same process.
TORCHAO_OPTIONS = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True,
                   "force_fuse_int_mm_with_mul": True, "triton.unique_kernel_names": True}


def compile_kwargs(settings: CompileSettings, cuda_graphs: bool = True, torchao: bool = False) -> dict:
    """torch.compile's Inductor options: the recipe's mode (less CUDA graphs if not
    ``cuda_graphs``) and freezing, torchao's recommended options for a model holding its
    quantized weights (``torchao``), and no size asserts.

    Inductor's generated code asserts every input's sizes and strides in Python on each call
    (hundreds of inputs in the int8 step); Dynamo's guards have checked the same before the
    graph runs."""
    from torch._inductor import list_mode_options

    mode = {k: v for k, v in list_mode_options(settings.mode).items() if cuda_graphs or k != "triton.cudagraphs"}
    extra = TORCHAO_OPTIONS if torchao else {}
    return {"options": {**mode, **extra, "freezing": settings.freezing, "size_asserts": False}}


def holds_torchao_weights(model: torch.nn.Module) -> bool:
    """Whether ``model`` has parameters quantized by torchao (its tensor subclasses)."""
    if "torchao" not in sys.modules:  # nothing can be torchao's then; spare its import
        return False
    from torchao.utils import TorchAOBaseTensor

    return any(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


def skip_vec_isa_probe() -> None:
    """Inductor's first CPU compile (or load) in a process probes vector ISAs by building test
    libraries and importing each in a fresh Python: seconds of every cold start. The CPU flags
    answer its base check; the AVX-512 BF16 and VNNI checks it makes besides (can this compiler
    build with those flags) are answered once per machine and remembered."""
    import torch._inductor.config

    import_cpp_extension()  # Inductor's CPU code builder imports it, noisily
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        torch._inductor.config.cpp.vec_isa_ok = True
        _remember_isa_checks()


_guard_lock = threading.Lock()
_guard_set = threading.Event()


def keep_cuda_guard_alive() -> None:
    """Set the no-op CUDA device guard that tracing sets on a machine without a usable GPU, from a
    thread that lasts as long as the process. torch 2.11 keeps it in the thread that first traces:
    once that thread ends (a Chat compiled in a worker thread), the next trace crashes."""
    with _guard_lock:
        if _guard_set.is_set():
            return
        if threading.current_thread() is threading.main_thread():
            torch._C._ensureCUDADeviceGuardSet()
            _guard_set.set()
            return
        threading.Thread(target=_hold_cuda_guard, name="quantkit-cuda-guard", daemon=True).start()
        _guard_set.wait()


def _hold_cuda_guard() -> None:
    torch._C._ensureCUDADeviceGuardSet()
    _guard_set.set()
    threading.Event().wait()  # the guard lives as long as this thread


ISA_CHECKS = "vec_isa_checks.json"


def _remember_isa_checks() -> None:
    """Make Inductor's ISA build checks answer from quantkit's cache (keyed by compiler, flags,
    torch version and test code), running each for real the first time."""
    from torch._inductor import cpu_vec_isa

    check = cpu_vec_isa.VecISA.check_build
    if getattr(check, "remembered", False):
        return
    fingerprint = getattr(cpu_vec_isa, "_get_isa_dry_compile_fingerprint", None)
    if fingerprint is None:  # another torch: leave its probe alone
        return
    path = cache_dir() / ISA_CHECKS

    def check_build(isa, code: str) -> bool:
        # torch keys its own build the same way (the bf16 check extends _arch_flags first)
        key = hashlib.sha256(f"{fingerprint(isa._arch_flags)}\0{code}".encode()).hexdigest()
        try:
            answers = json.loads(path.read_text())
        except (OSError, ValueError):
            answers = {}
        if not isinstance(answers, dict):  # not ours: overwritten with real answers
            answers = {}
        if not isinstance(answers.get(key), bool):
            answers[key] = bool(check(isa, code))
            write_text(path, json.dumps(answers, indent=1))
        return answers[key]

    check_build.remembered = True
    cpu_vec_isa.VecISA.check_build = check_build
