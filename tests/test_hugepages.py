"""Weights and KV cache on huge pages: same values, one buffer, pages the OS really made huge."""

import re
from pathlib import Path

import pytest
import torch

from quantkit import hugepages


def test_rehoused_tensors_keep_values_in_one_buffer_in_order():
    tensors = [torch.randint(-128, 127, (5, 3, 4, 64), dtype=torch.int8), torch.randn(7, 3),
               torch.arange(130, dtype=torch.int32)]
    given = list(tensors)
    views = list(hugepages.rehouse(given))
    assert given == [None] * 3  # originals released as copied
    base = views[0].untyped_storage().data_ptr()
    for t, v in zip(tensors, views):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert v.untyped_storage().data_ptr() == base  # one allocation
        assert v.data_ptr() % 64 == 0
    assert views[0].data_ptr() < views[1].data_ptr() < views[2].data_ptr()  # the order given
    assert views[0].data_ptr() % hugepages.HUGE_PAGE == 0


def _thp_mode() -> str | None:
    try:
        return re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text())[1]
    except (OSError, TypeError):
        return None


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m[1], 16) <= address < int(m[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_buffer_is_backed_by_huge_pages():
    buf = hugepages.empty((16 << 20,)).fill_(1)  # first touch after madvise: faults in huge pages
    assert _anon_huge_kib(buf.data_ptr()) >= 2048


def test_empty_is_a_typed_tensor_on_a_huge_page_boundary():
    t = hugepages.empty((3, 1024, 64), torch.bfloat16)
    assert t.shape == (3, 1024, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
