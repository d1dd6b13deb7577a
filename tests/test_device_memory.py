"""rlhf_ds/device_memory.py on the CPU: the per-phase peak sees a phase's allocation and forgets it after a reset."""
import sys

import pytest
import torch

from rlhf_ds import device_memory

CPU = torch.device("cpu")
MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is reset through /proc/self/clear_refs")
def test_peak_covers_only_what_happened_since_the_reset():
    device_memory.reset_peak(CPU)
    before = device_memory.peak_mb(CPU)
    block = torch.ones(300 * MIB // 4)  # 300 MiB, touched
    inside = device_memory.peak_mb(CPU)
    del block
    device_memory.reset_peak(CPU)
    after = device_memory.peak_mb(CPU)
    assert inside - before >= 290, (before, inside)
    assert inside - after >= 290, "the reset must forget the freed block"


def test_free_bytes_is_the_hosts_available_memory_split_between_local_ranks(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    alone = device_memory.free_bytes(CPU)
    assert alone > 100 * MIB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device_memory.free_bytes(CPU) == pytest.approx(alone / 4, rel=0.05)
