"""One served copy of a model version: its session, its batch queue, and what it has answered.

A version's copy is what a request is routed to. Successes are logged by the batch that answered
them (a few floats in :attr:`ServedVersion.batch_log`) and folded into ``stats`` and ``metrics``
in bulk; a failure is recorded at once with :meth:`ServedVersion.record_failure`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.arrivals import Arrivals
from services.batcher import Batcher, Pending
from services.errors import status_name
from services.metrics import VersionMetrics
from services.model import OnnxModel
from services.stats import FOLD_AT, BatchLog, VersionStats


@dataclass(slots=True)
class ServedVersion:
    model: OnnxModel
    batcher: Batcher
    metrics: VersionMetrics
    stats: VersionStats = field(default_factory=VersionStats)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards ``batch_log``, ``stats`` and ``metrics``: batches (``instances`` at a time), failed
    requests and readers of one version run on many threads."""
    batch_log: BatchLog = field(default_factory=BatchLog)
    """Answered requests not yet added to ``stats`` and ``metrics`` (see :meth:`flush`)."""

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def inflight(self) -> int:
        return self.batcher.inflight

    @classmethod
    def start(cls, model: OnnxModel, metrics: VersionMetrics, arrivals: Arrivals | None = None) -> ServedVersion:
        """Wrap a loaded model with its queue, ready to take requests."""
        served: ServedVersion

        def on_batch(batch: Sequence[Pending], rows: int, started: float, done: float) -> None:
            # The requests' own threads record nothing on success (see Batcher).
            with served.lock:
                served.batch_log.add(batch, rows, started, done)

        def after_batch() -> None:
            if len(served.batch_log) >= FOLD_AT:  # read without the lock: a few requests more do not matter
                served.flush()

        served = cls(model, Batcher(model, on_batch, arrivals, after_batch), metrics)
        metrics.attach(served)
        return served

    def record_failure(self, error: BaseException, since: float) -> None:
        """A request routed here failed (``since``: its ``time.monotonic()`` arrival): counted in
        the statistics' failures and under its gRPC code in the metrics."""
        with self.lock:
            self.stats.fail.add(time.monotonic() - since)
            self.metrics.count(status_name(error))

    def flush(self) -> None:
        """Add the logged requests to ``stats`` and ``metrics``: before reading either."""
        with self.lock:
            samples = self.batch_log.take()
            if samples is not None:
                self.stats.add(samples)
                self.metrics.add(samples)
