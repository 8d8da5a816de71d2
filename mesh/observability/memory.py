"""Where a process's memory is: snapshots (RSS, garbage collector, tracemalloc's allocation sites,
what the component adds) and the difference between two of them.

tracemalloc is off until switched on (:meth:`MemoryDebugger.set_tracing`): while it traces, every
allocation records its site, which slows allocation-heavy code (docs/benchmarks.md, "Profiling").
Snapshots taken while it is off still carry RSS, the collector's counts and the component's part.

The debugger keeps the last :data:`KEEP` snapshots under ids (``m1``, ``m2``…), so a later one can be
diffed against an earlier one by id; older ones are forgotten, and all are lost with the process.
"""

from __future__ import annotations

import gc
import re
import threading
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mesh.observability.profiling import short_file

KEEP = 8
"""Snapshots kept for diffs."""
MAX_TOP = 500
"""Most allocation sites one answer lists."""
MAX_SITES = 20_000
"""Sites a kept snapshot remembers (the largest), bounding what :data:`KEEP` snapshots hold."""
MAX_FRAMES = 25
"""Deepest traceback tracemalloc may record per allocation (the cost grows with it)."""
SNAPSHOT_ID = re.compile(r"m[0-9]{1,9}")

_FILTERS = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


class UnknownSnapshotError(LookupError):
    """A diff asked for a snapshot id this process does not (or no longer) keep."""


def _status_kib(field_name: str) -> int | None:
    """A ``VmRSS``-like field of /proc/self/status in bytes (None off Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return None


@dataclass
class _Kept:
    id: str
    document: dict[str, Any]
    sites: dict[str, tuple[int, int]] = field(default_factory=dict)
    """file:line → (bytes, allocations), when tracemalloc traced."""


Extras = Callable[[], dict[str, Any]]


class MemoryDebugger:
    """Snapshots of this process's memory; thread-safe (the admin server answers on many threads)."""

    def __init__(self, extras: Extras | None = None) -> None:
        self._extras = extras
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._counter = 0
        self._lock = threading.Lock()

    @staticmethod
    def tracing() -> dict[str, Any]:
        traced, peak = tracemalloc.get_traced_memory()
        return {"tracing": tracemalloc.is_tracing(), "frames": tracemalloc.get_traceback_limit(),
                "traced_bytes": traced, "peak_traced_bytes": peak,
                "overhead_bytes": tracemalloc.get_tracemalloc_memory()}

    def set_tracing(self, on: bool, frames: int = 1) -> dict[str, Any]:
        """Start (or stop) tracemalloc; starting while it traces with another depth restarts it."""
        if not 1 <= frames <= MAX_FRAMES:
            raise ValueError(f"frames must be 1-{MAX_FRAMES}, got {frames}")
        with self._lock:
            if on:
                if tracemalloc.is_tracing() and tracemalloc.get_traceback_limit() != frames:
                    tracemalloc.stop()
                if not tracemalloc.is_tracing():
                    tracemalloc.start(frames)
            elif tracemalloc.is_tracing():
                tracemalloc.stop()
        return self.tracing()

    def snapshot(self, top: int = 25, diff_from: str | None = None) -> dict[str, Any]:
        """A new snapshot (kept under its ``id``), with ``top`` allocation sites and, given the id of
        an earlier one, what changed since."""
        if not 0 <= top <= MAX_TOP:
            raise ValueError(f"top must be 0-{MAX_TOP}, got {top}")
        if diff_from is not None and not SNAPSHOT_ID.fullmatch(diff_from):
            raise ValueError(f"diff_from must be a snapshot id such as m3, got {diff_from[:40]!r}")
        with self._lock:
            earlier = self._kept.get(diff_from) if diff_from is not None else None
            if diff_from is not None and earlier is None:
                raise UnknownSnapshotError(
                    f"no snapshot {diff_from} here (kept: {', '.join(self._kept) or 'none'}; the last {KEEP} "
                    "are kept, and none survive a restart)")
            self._counter += 1
            snapshot_id = f"m{self._counter}"
        sites: dict[str, tuple[int, int]] = {}
        document: dict[str, Any] = {
            "id": snapshot_id, "taken": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rss_bytes": _status_kib("VmRSS"), "peak_rss_bytes": _status_kib("VmHWM"),
            "threads": threading.active_count(),
            "gc": {"counts": list(gc.get_count()), "objects": len(gc.get_objects()),
                   "collections": [s.get("collections", 0) for s in gc.get_stats()],
                   "uncollectable": len(gc.garbage)},
            "tracemalloc": self.tracing(),
        }
        if tracemalloc.is_tracing():
            statistics = tracemalloc.take_snapshot().filter_traces(_FILTERS).statistics("lineno")
            for stat in statistics[:MAX_SITES]:
                where = stat.traceback[0]
                sites[f"{short_file(where.filename)}:{where.lineno}"] = (stat.size, stat.count)
            document["top"] = [{"site": site, "bytes": size, "count": count}
                               for site, (size, count) in list(sites.items())[:top]]
        if self._extras is not None:
            document["component"] = self._extras()
        if earlier is not None:
            document["diff"] = _diff(earlier, document, sites, top)
        with self._lock:
            self._kept[snapshot_id] = _Kept(snapshot_id, document, sites)
            while len(self._kept) > KEEP:
                self._kept.popitem(last=False)
        return document


def _delta(now: Any, before: Any) -> int | None:
    return now - before if isinstance(now, int) and isinstance(before, int) else None


def _diff(earlier: _Kept, now: dict[str, Any], sites: dict[str, tuple[int, int]], top: int) -> dict[str, Any]:
    before = earlier.document
    changes: list[dict[str, Any]] = []
    for site in sites.keys() | earlier.sites.keys():
        size, count = sites.get(site, (0, 0))
        old_size, old_count = earlier.sites.get(site, (0, 0))
        if size != old_size or count != old_count:
            changes.append({"site": site, "bytes": size - old_size, "count": count - old_count,
                            "bytes_now": size})
    changes.sort(key=lambda change: -abs(change["bytes"]))
    traced_now = now["tracemalloc"]["traced_bytes"] if now["tracemalloc"]["tracing"] else None
    traced_before = before["tracemalloc"]["traced_bytes"] if before["tracemalloc"]["tracing"] else None
    diff: dict[str, Any] = {
        "from": earlier.id, "from_taken": before["taken"],
        "rss_bytes": _delta(now["rss_bytes"], before["rss_bytes"]),
        "threads": now["threads"] - before["threads"],
        "gc_objects": now["gc"]["objects"] - before["gc"]["objects"],
        "traced_bytes": _delta(traced_now, traced_before),
        "sites_compared": bool(sites) and bool(earlier.sites),
        "top": changes[:top],
    }
    if not diff["sites_compared"]:
        diff["note"] = ("allocation sites need tracemalloc tracing during both snapshots "
                        "(POST /debug/memory/tracing?on=1, or sluice debug memory --trace on)")
    if "component" in before:
        diff["component_before"] = before["component"]
    return diff
