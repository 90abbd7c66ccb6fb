"""What the evaluator measures of the machine: its memory read bandwidth (the ceiling of a
memory-bound decode step), peak memory, and the software and hardware a report names."""

from __future__ import annotations

import logging
import platform
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def peak_memory(device: torch.device | str) -> int:
    """Peak memory of this process in bytes: CUDA's allocated peak, or on CPU the resident peak."""
    if "cuda" in str(device):
        import torch

        return int(torch.cuda.max_memory_allocated())
    try:  # Linux: VmHWM, which reset_peak can reset
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:", 1)[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def process_seconds() -> float:
    """Seconds since this process started: a cold start as a user waits for it, imports included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def reset_peak(device: torch.device | str) -> None:
    """Restart the peak from now (CUDA's allocated peak, or on Linux the resident peak), so a
    freed probe buffer does not count."""
    if "cuda" in str(device):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except OSError as exc:
        log.debug("peak RSS not reset (%s): it includes the bandwidth probe", exc)


PROBE_BYTES = 256 << 20  # 8x this machine's L3


def environment(device: str) -> dict[str, Any]:
    """Package versions, CPU, GPU, threads and the read bandwidth, for a report's header."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name(device) if "cuda" in str(device) else None  # "cuda:1": that GPU
    return {"torch": torch.__version__, "torchao": ver("torchao"), "chattts": ver("chattts"),
            "transformers": ver("transformers"), "bitsandbytes": ver("bitsandbytes"),
            "python": platform.python_version(), "cpu": _cpu_name(), "gpu": gpu,
            "threads": torch.get_num_threads(),
            "read_bandwidth_gbs": read_bandwidth_gbs(device=device)}


def probe_buffer(nbytes: int = PROBE_BYTES, device: torch.device | str = "cpu") -> torch.Tensor:
    """A buffer of ``nbytes`` for read_bandwidth_gbs, kept across repeated probes: on CPU on
    huge pages, on a GPU in its memory (256 MiB is 5x an H100's L2)."""
    import torch

    from quantkit import hugepages

    if "cuda" in str(device):
        return torch.ones(nbytes // 4, device=device)
    return hugepages.empty((nbytes // 4,), torch.float32).fill_(1.0)


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5, buffer: torch.Tensor | None = None,
                      device: torch.device | str = "cpu") -> float:
    """The device's memory read bandwidth (best of a few sums over a buffer far beyond cache,
    ``buffer`` or a new one of ``gib`` on ``device``): the ceiling for a memory-bound decode
    step. On CPU the buffer is on huge pages, as the compiled steps' weights are (faster than
    4 KiB pages): the higher, fair ceiling."""
    import torch

    x = probe_buffer(int(gib * 2**30), device) if buffer is None else buffer
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats + x.is_cuda):  # on a GPU the first sum also loads its kernel
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best / 1e9


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
