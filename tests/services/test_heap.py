"""services.heap: the glibc arena cap and the periodic malloc_trim (this machine runs glibc)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import platform

import pytest

from services.heap import HeapTrimmer, limit_arenas

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_arena_cap_is_taken_and_zero_leaves_the_default() -> None:
    assert limit_arenas(0) is False  # nothing asked, nothing set
    assert limit_arenas(64) is True  # a cap above what this process uses changes nothing here


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
