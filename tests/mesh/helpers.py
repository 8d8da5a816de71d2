"""Waiting helpers for async tests: every wait has a deadline and names what it waited for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from mesh.errors import MeshError

T = TypeVar("T")


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.1) -> float:
    """Await ``predicate`` until true; returns the seconds it took. etcd errors count as "not yet"."""
    start = time.monotonic()
    while True:
        try:
            if await predicate():
                return time.monotonic() - start
        except MeshError:
            pass
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


async def next_event(events: AsyncIterator[T], timeout: float = 10.0) -> T:
    """The next item of an async iterator, or fail after ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(anext(events), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"no watch event within {timeout:.1f}s")
