"""services.heap: the glibc arena cap and the periodic malloc_trim (this machine runs glibc)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import platform
import subprocess
import sys

import pytest

from services.heap import HeapTrimmer, fix_mmap_threshold, limit_arenas

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_arena_cap_is_taken_and_zero_leaves_the_default() -> None:
    assert limit_arenas(0) is False  # nothing asked, nothing set
    assert limit_arenas(64) is True  # a cap above what this process uses changes nothing here


# Runs in a fresh interpreter: the threshold is process-wide and glibc's sliding one only climbs.
_BURST = """
import ctypes, ctypes.util, sys
from services.heap import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(128 * 1024)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
libc.free(libc.malloc(4 << 20))  # one freed 4 MiB block: glibc raises its threshold past 4 MiB
before = rss()
big, keep = [], []
for _ in range(100):  # a burst of 1 MiB request buffers, small live objects between them
    block = libc.malloc(1 << 20)
    ctypes.memset(block, 1, 1 << 20)
    big.append(block)
    keep.append(libc.malloc(64))
for block in big:
    libc.free(block)
print((rss() - before) >> 20)
"""


def _burst_residue_mb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _BURST, mode], capture_output=True, text=True, timeout=60,
                          check=True)
    return int(done.stdout)


@glibc
def test_a_fixed_mmap_threshold_hands_a_burst_of_large_buffers_back() -> None:
    assert fix_mmap_threshold(0) is False  # 0: glibc's sliding default, nothing set
    sliding, fixed = _burst_residue_mb("sliding"), _burst_residue_mb("fixed")
    assert sliding >= 80, f"glibc kept {sliding} MB of the 100 MB burst with its sliding threshold"
    assert fixed <= 5, f"{fixed} MB of the 100 MB burst stayed with the threshold fixed at 128 KiB"


@glibc
def test_trim_hands_freed_memory_back() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # Blocks below the mmap threshold, every other one freed: holes between live blocks, which
    # free() cannot give back (only the top of the heap) and malloc_trim can (whole free pages).
    blocks = [libc.malloc(64 * 1024) for _ in range(512)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[::2]:
        libc.free(block)
    trimmer = HeapTrimmer(1.0)
    assert trimmer.available
    try:
        assert trimmer.trim() is True
    finally:
        for block in blocks[1::2]:
            libc.free(block)
    assert HeapTrimmer(0).available is False
    assert HeapTrimmer(0).trim() is False


@glibc
async def test_trimmer_runs_every_interval_until_stopped() -> None:
    calls: list[float] = []

    class Counting(HeapTrimmer):
        def trim(self) -> bool:
            calls.append(0.0)  # called on a worker thread: no loop here
            return super().trim()

    trimmer = Counting(0.05)
    trimmer.start()
    await asyncio.sleep(0.4)
    await trimmer.stop()
    seen = len(calls)
    assert seen >= 3
    await asyncio.sleep(0.2)
    assert len(calls) == seen  # stopped means stopped
