"""Giving freed heap memory back to the system.

glibc's malloc gives each thread that allocates its own arena (up to eight per core). Memory a
handler thread frees stays in that thread's arena, so after a burst of large requests (a client
sending 1 MiB names, say) the service's RSS stays at the burst's peak although nothing holds the
memory: measured with bench/fuzz.py, +22 % RSS after 10,000 malformed requests, all of it in the
first tenth of the run. Three remedies, all glibc-only (elsewhere they do nothing):

* :func:`fix_mmap_threshold` keeps the size from which an allocation gets its own mmap fixed
  (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_`` does): glibc otherwise raises it
  to the largest block freed so far, and a burst of 1 MiB requests then lives on in the arenas.
  Measured +1.9 % RSS instead of +20.4 % on the same run, at most a few per cent of throughput on
  the heavy model (three interleaved rounds), so it is on by default at 128 KiB;

* :func:`limit_arenas` caps the number of arenas at process start (``mallopt(M_ARENA_MAX)``, what
  the ``MALLOC_ARENA_MAX`` environment variable does), so freed memory is reused by every thread
  instead of being stranded in one: measured +5.8 % instead of +22 % on the same run, but the
  heavy model ran 7-13 % slower (ONNX Runtime's threads share the arenas), so it is opt-in;
* :class:`HeapTrimmer` calls ``malloc_trim(0)`` every few seconds on a worker thread, handing the
  free pages of every arena back to the system after a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)."""


def _libc_function(name: str) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    return function


def limit_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas`` (0 leaves glibc's default, eight per core). Call it
    before any thread starts; True if the C library took the setting."""
    mallopt = _libc_function("mallopt") if arenas > 0 else None
    if mallopt is None:
        return False
    return bool(mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(arenas)))


def fix_mmap_threshold(threshold: int) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap (0 leaves glibc's
    default). glibc starts at 128 KiB but raises the threshold each time such a block is freed, up
    to 32 MiB, so that after a burst of large requests their buffers come from the arenas and stay
    in RSS; a fixed threshold hands each one back to the system when it is freed. True if the C
    library took the setting."""
    mallopt = _libc_function("mallopt") if threshold > 0 else None
    if mallopt is None:
        return False
    return bool(mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(threshold)))


def _malloc_trim() -> Callable[..., int] | None:
    return _libc_function("malloc_trim")


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` every ``interval`` seconds while started (0 turns it off)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._trim = _malloc_trim() if interval > 0 else None
        self._task: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        """The C library has ``malloc_trim`` and trimming is on."""
        return self._trim is not None

    def trim(self) -> bool:
        """Trim now (blocking, a few ms); True if the C library released memory."""
        return self._trim is not None and self._trim(ctypes.c_size_t(0)) == 1

    def start(self) -> None:
        if self._trim is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heap-trimmer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.trim)
            except Exception:  # never worth ending the service for
                log.exception("heap_trim_failed")
