"""Per-version counters in the shape of Triton's ModelStatistics (durations in nanoseconds), and
the log of answered requests they (and the Prometheus series) are computed from.

A batch leader only appends five floats per request to the version's :class:`BatchLog`; turning
them into counters and histograms happens in bulk, with numpy, when somebody reads them (a
statistics RPC, a scrape) or when the log has grown to :data:`FOLD_AT` requests. Measured on one
core, recording each request's durations one by one cost about a tenth of the whole request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

FOLD_AT = 1024
"""Requests logged before a batch leader folds the log itself, once its callers are answered
(measured on one core: 0.4 ms per 1,024 requests, 0.4 µs each)."""


class Answered(Protocol):
    """A request answered by a batch: when it reached the service and when it was queued."""

    @property
    def since(self) -> float: ...
    @property
    def enqueued(self) -> float: ...


Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Samples:
    """Folded log entries (seconds). Per request: ``queue``, ``compute`` (its batch's), ``total``;
    per ONNX Runtime call: ``batch_rows`` and ``batch_compute``."""

    queue: Floats
    compute: Floats
    total: Floats
    batch_rows: npt.NDArray[np.int64]
    batch_compute: Floats
    last_done: float
    """time.monotonic() of the newest answer."""

    @property
    def requests(self) -> int:
        return len(self.total)


class BatchLog:
    """Answered requests, five floats each: (started, done, rows, since, enqueued) where
    ``started``/``done`` bound the batch's ONNX Runtime call, ``rows`` is the batch's row count on
    its first request and -1 on the others. Not thread-safe: the version's lock guards it."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: list[float] = []

    def __len__(self) -> int:
        return len(self._values) // 5

    def add(self, batch: Sequence[Answered], rows: int, started: float, done: float) -> None:
        values = self._values
        first = batch[0]
        values += (started, done, rows, first.since, first.enqueued)
        for item in batch[1:]:
            values += (started, done, -1, item.since, item.enqueued)

    def take(self) -> Samples | None:
        """Everything logged so far, folded; the log starts over."""
        if not self._values:
            return None
        log = np.array(self._values, dtype=np.float64).reshape(-1, 5)
        self._values = []
        started, done, rows = log[:, 0], log[:, 1], log[:, 2]
        first = rows >= 0
        compute = done - started
        return Samples(queue=started - log[:, 4], compute=compute, total=done - log[:, 3],
                       batch_rows=rows[first].astype(np.int64), batch_compute=compute[first],
                       last_done=float(done.max()))


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def add_all(self, seconds: npt.NDArray[Any]) -> None:
        self.count += len(seconds)
        self.ns += round(float(seconds.sum()) * 1e9)


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    """Rows inferred (a batch of 8 rows counts 8)."""
    execution_count: int = 0
    """ONNX Runtime calls."""
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)
    """Per batch size: how many calls and their compute time."""

    def add(self, samples: Samples) -> None:
        """Successful requests and the ONNX Runtime calls that answered them."""
        self.success.add_all(samples.total)
        self.queue.add_all(samples.queue)
        self.inference_count += int(samples.batch_rows.sum())
        self.execution_count += len(samples.batch_rows)
        self.compute_infer.add_all(samples.batch_compute)
        sizes, where = np.unique(samples.batch_rows, return_inverse=True)
        seconds = np.bincount(where, weights=samples.batch_compute, minlength=len(sizes))
        calls = np.bincount(where, minlength=len(sizes))
        for size, count, total in zip(sizes.tolist(), calls.tolist(), seconds.tolist(), strict=True):
            duration = self.batches.setdefault(size, Duration())
            duration.count += count
            duration.ns += round(total * 1e9)
        # Wall-clock time of the newest answer (the log keeps monotonic times).
        last = int((time.time() - (time.monotonic() - samples.last_done)) * 1000)
        self.last_inference_ms = max(self.last_inference_ms, last)
