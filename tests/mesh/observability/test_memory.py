"""Memory snapshots and diffs of this test process (tracemalloc switched on and off for real)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.observability.memory import KEEP, MemoryDebugger, UnknownSnapshotError

KEPT: list[bytearray] = []


def allocate_in_a_known_place(count: int) -> None:
    KEPT.extend(bytearray(4096) for _ in range(count))


@pytest.fixture
def debugger() -> Iterator[MemoryDebugger]:
    was_tracing = tracemalloc.is_tracing()
    debugger = MemoryDebugger(extras=lambda: {"versions": [], "loaded": 0})
    yield debugger
    KEPT.clear()
    if not was_tracing:
        tracemalloc.stop()


def test_snapshot_without_tracing_has_rss_gc_and_the_component_part(debugger: MemoryDebugger) -> None:
    debugger.set_tracing(False)
    snapshot = debugger.snapshot()
    assert snapshot["id"] == "m1"
    assert snapshot["rss_bytes"] > 10 * 1024 * 1024
    assert snapshot["gc"]["objects"] > 1000 and len(snapshot["gc"]["collections"]) == 3
    assert snapshot["tracemalloc"]["tracing"] is False and "top" not in snapshot
    assert snapshot["component"] == {"versions": [], "loaded": 0}


def test_diff_names_the_line_that_allocated(debugger: MemoryDebugger) -> None:
    state = debugger.set_tracing(True)
    assert state["tracing"] is True and state["frames"] == 1
    before = debugger.snapshot(top=5)
    allocate_in_a_known_place(2000)  # about 8 MiB
    after = debugger.snapshot(top=5, diff_from=before["id"])
    diff: dict[str, Any] = after["diff"]
    assert diff["from"] == before["id"] and diff["sites_compared"] is True
    grown = diff["top"][0]
    assert "test_memory.py:" in grown["site"], diff["top"]
    assert grown["bytes"] >= 2000 * 4096 and grown["count"] >= 2000
    assert diff["traced_bytes"] >= 2000 * 4096
    assert after["top"][0]["site"] == grown["site"]


def test_diff_without_tracing_says_how_to_get_sites(debugger: MemoryDebugger) -> None:
    debugger.set_tracing(False)
    first = debugger.snapshot()
    diff = debugger.snapshot(diff_from=first["id"])["diff"]
    assert diff["sites_compared"] is False and "tracing?on=1" in diff["note"]
    assert isinstance(diff["rss_bytes"], int)


def test_only_the_last_snapshots_are_kept(debugger: MemoryDebugger) -> None:
    ids = [debugger.snapshot(top=0)["id"] for _ in range(KEEP + 2)]
    with pytest.raises(UnknownSnapshotError, match=f"no snapshot {ids[0]} here"):
        debugger.snapshot(diff_from=ids[0])
    assert debugger.snapshot(diff_from=ids[-1])["diff"]["from"] == ids[-1]


@pytest.mark.parametrize("bad", ["", "m", "x1", "m1; rm -rf /", "m" + "1" * 20])
def test_malformed_snapshot_ids_are_refused(debugger: MemoryDebugger, bad: str) -> None:
    with pytest.raises(ValueError, match="snapshot id"):
        debugger.snapshot(diff_from=bad)


def test_limits(debugger: MemoryDebugger) -> None:
    with pytest.raises(ValueError, match="top"):
        debugger.snapshot(top=501)
    with pytest.raises(ValueError, match="frames"):
        debugger.set_tracing(True, frames=26)
    assert debugger.set_tracing(True, frames=3)["frames"] == 3
    assert debugger.set_tracing(False)["tracing"] is False
