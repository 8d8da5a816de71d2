"""Giving freed heap memory back to the system.

glibc's malloc gives each thread that allocates its own arena (up to eight per core). Memory a
handler thread frees stays in that thread's arena, so after a burst of large requests (a client
sending 1 MiB names, say) the service's RSS stays at the burst's peak although nothing holds the
memory: measured with bench/fuzz.py, +22 % RSS after 10,000 malformed requests, all of it in the
first tenth of the run. Two remedies, both glibc-only (elsewhere they do nothing):

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


_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


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
