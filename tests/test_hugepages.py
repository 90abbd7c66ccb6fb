"""Weights and KV cache on huge pages: same values, one mapping, pages the OS really made huge."""

import re
from pathlib import Path

import pytest
import torch

from quantkit import hugepages


def test_rehoused_tensors_keep_values_end_to_end_in_one_mapping_each_its_own_storage():
    tensors = [torch.randint(-128, 127, (5, 3, 4, 64), dtype=torch.int8), torch.randn(7, 3),
               torch.arange(130, dtype=torch.int32)]
    given = list(tensors)
    views = list(hugepages.rehouse(given))
    assert given == [None] * 3  # originals released as copied
    for t, v in zip(tensors, views):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert v.data_ptr() % 64 == 0
        # its own storage, at offset 0: what lets one compiled layer serve every layer
        assert v.storage_offset() == 0 and v.untyped_storage().data_ptr() == v.data_ptr()
    assert len({v.untyped_storage().data_ptr() for v in views}) == 3
    # laid end to end in the order given, from a huge-page boundary: one mapping
    assert views[0].data_ptr() % hugepages.HUGE_PAGE == 0
    assert views[1].data_ptr() - views[0].data_ptr() == 5 * 3 * 4 * 64
    assert views[2].data_ptr() - views[1].data_ptr() == 128  # 84 bytes, rounded to cache lines
    views[1].fill_(0)
    assert torch.equal(views[0], tensors[0]) and torch.equal(views[2], tensors[2])  # no overlap


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
