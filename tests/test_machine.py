"""The evaluator's machine measurements: peak memory, read bandwidth, the environment a report names."""

import sys

import numpy as np
import pytest
import torch

from quantkit.machine import environment, peak_memory, probe_buffer, read_bandwidth_gbs, reset_peak

MIB = 1 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resetting the peak needs /proc/self/clear_refs")
def test_peak_memory_counts_a_touched_allocation_until_reset():
    reset_peak("cpu")
    before = peak_memory("cpu")
    block = np.ones(256 * MIB // 8)  # written: resident
    grown = peak_memory("cpu")
    del block
    reset_peak("cpu")
    assert grown - before >= 240 * MIB
    assert peak_memory("cpu") <= grown - 200 * MIB


def test_read_bandwidth_is_bytes_over_seconds_of_a_sum():
    buf = probe_buffer(64 * MIB)
    assert buf.numel() * buf.element_size() == 64 * MIB and bool((buf == 1).all())
    assert 0.5 < read_bandwidth_gbs(buffer=buf, repeats=2) < 2000  # GB/s, not bytes/s or GiB/ms


def test_environment_names_what_ran():
    env = environment("cpu")
    assert env["torch"] == torch.__version__ and env["chattts"] and env["torchao"]
    assert env["cpu"] and env["gpu"] is None and env["threads"] == torch.get_num_threads()
    assert env["read_bandwidth_gbs"] > 0.5
