"""Memory on transparent huge pages, for the weights a decode step streams.

A decode step reads every weight once: from 4 KiB pages that is a TLB miss every 4 KiB, and in
a virtual machine each miss walks two page tables. From 2 MiB pages, here (one process, steps
interleaved against 4 KiB pages): int8-dynamic-compiled steps 3% faster (weights and KV cache),
bf16-compiled 10%, fp32-compiled 2% (not taken: see StaticCacheGPT._rehouse_weights); a plain
sum over 1 GiB 8%. Linux backs anonymous
memory with huge pages only where asked (``madvise``) on most systems, and torch's allocator
asks only with ``THP_MEM_ALLOC_ENABLE=1`` set before its first allocation; so the weights are
moved into one mapping that asks. Where the kernel refuses (another OS, THP off) it is plain
memory and everything works as before.
"""

from __future__ import annotations

import logging
import math
import mmap
import platform
from typing import Iterator

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # a cache line: every view starts on one


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, starting on a huge-page boundary, whose
    pages come as huge pages where the OS gives them.

    Its own private anonymous mapping, not torch's allocator: below 32 MiB glibc may hand back
    heap pages already touched as 4 KiB pages, which ``madvise`` no longer changes."""
    return empty_each([(shape, dtype)])[0]


def empty_each(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Empty tensors of these (shape, dtype), laid end to end in one huge-page mapping (as
    ``empty``), each with a storage of its own: to torch they share no memory (a compiled region
    refuses inputs that do) and all start at offset 0 of their storage (one compiled layer
    serves all layers only where its inputs' offsets match too)."""
    if platform.system() != "Linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    padded = [-(-n // _ALIGN) * _ALIGN for n in sizes]  # every tensor starts on a cache line
    region = mmap.mmap(-1, sum(padded) + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as exc:  # THP compiled out: plain pages
        log.debug("no huge pages: %s", exc)
    offset = -torch.frombuffer(region, dtype=torch.uint8).data_ptr() % HUGE_PAGE
    tensors = []
    for (shape, dtype), n, step in zip(specs, sizes, padded):
        # frombuffer keeps the mapping alive; pages are only committed when written
        tensors.append(torch.frombuffer(region, dtype=torch.uint8, count=n, offset=offset).view(dtype).view(shape))
        offset += step
    return tensors


def rehouse(tensors: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Copies of CPU tensors laid end to end, in the given order (the order a step reads them),
    in one huge-page mapping (``empty_each``): yields each copy (same dtype, shape and values)
    as soon as it is made, and drops the list's reference to the original, so that a caller who
    swaps each copy in at once never holds two copies of everything."""
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
    copies = empty_each([(tuple(t.shape), t.dtype) for t in tensors])
    for i, copy in enumerate(copies):
        t, tensors[i] = tensors[i], None
        copy.copy_(t)
        del t
        yield copy
