"""Prometheus metrics of the model service, on their own Prometheus registry and the admin port
(mesh/observability/admin.py: ``/metrics`` and ``/debug/...``).

The per-request series are plain counters and bucket counts, added to in bulk from each
version's log of answered requests (services/stats.py) and turned into Prometheus families when
scraped: the request path appends a few floats instead of updating a dozen series per request.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mesh.observability.admin import AdminServer, DebugAccess
from services.arrivals import Arrivals
from services.stats import Samples

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class BulkHistogram:
    """A histogram filled in bulk from folded samples (:meth:`observe_all`), by one thread at a
    time (the version's lock): counts per bucket, made cumulative when scraped."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe_all(self, values: npt.NDArray[Any]) -> None:
        if not len(values):
            return
        # side="left": a value equal to a bound falls in that bound's bucket (Prometheus' le).
        where = np.searchsorted(np.asarray(self.bounds), values, side="left")
        for index, count in enumerate(np.bincount(where, minlength=len(self.counts)).tolist()):
            self.counts[index] += count
        self.sum += float(values.sum())
        self.count += len(values)

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class _Source(Protocol):
    """A served copy of the version: its requests in flight, its log of answered ones."""

    @property
    def inflight(self) -> int: ...
    def flush(self) -> None: ...


class VersionMetrics:
    """The series of one (model, version), written under the version's lock."""

    __slots__ = ("_sources", "batch", "codes", "compute", "model", "queue", "total", "version")

    def __init__(self, model: str, version: int) -> None:
        self.model = model
        self.version = str(version)
        self.codes: dict[str, int] = {}
        self._sources: list[_Source] = []
        """The served copies of this version (two while a replaced copy drains)."""
        self.queue = BulkHistogram(_LATENCY_BUCKETS)
        self.compute = BulkHistogram(_LATENCY_BUCKETS)
        self.total = BulkHistogram(_LATENCY_BUCKETS)
        self.batch = BulkHistogram(_BATCH_BUCKETS)

    def count(self, code: str) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1

    def add(self, samples: Samples) -> None:
        """Successful requests and the ONNX Runtime calls that answered them."""
        self.codes["OK"] = self.codes.get("OK", 0) + samples.requests
        self.queue.observe_all(samples.queue)
        self.compute.observe_all(samples.compute)
        self.total.observe_all(samples.total)
        self.batch.observe_all(samples.batch_rows)

    def attach(self, source: _Source) -> None:
        self._sources.append(source)

    def detach(self, source: _Source) -> None:
        """A drained copy: flushed one last time, then no longer read."""
        source.flush()
        self._sources = [s for s in self._sources if s is not source]

    def flush(self) -> None:
        """Bring the series up to date with every copy's log."""
        for source in list(self._sources):
            source.flush()

    @property
    def inflight(self) -> int:
        return sum(s.inflight for s in list(self._sources))


class _RequestCollector(Collector):
    def __init__(self, versions: dict[tuple[str, int], VersionMetrics]) -> None:
        self._versions = versions

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        versions = list(self._versions.values())  # the loop may add one while we read
        requests = CounterMetricFamily("sluice_requests", "Inference requests by model, version and gRPC code",
                                       labels=["model", "version", "code"])
        latency = HistogramMetricFamily("sluice_request_duration_seconds",
                                        "Inference request latency by phase (queue, compute, total)",
                                        labels=["model", "version", "phase"])
        batch = HistogramMetricFamily("sluice_batch_size", "Rows per ONNX Runtime call", labels=["model", "version"])
        inflight = GaugeMetricFamily("sluice_inflight_requests", "Inference requests being handled",
                                     labels=["model", "version"])
        for v in versions:
            v.flush()
            for code, value in list(v.codes.items()):
                requests.add_metric([v.model, v.version, code], value)
            for phase, hist in (("queue", v.queue), ("compute", v.compute), ("total", v.total)):
                latency.add_metric([v.model, v.version, phase], hist.cumulative(), hist.sum)
            batch.add_metric([v.model, v.version], v.batch.cumulative(), v.batch.sum)
            inflight.add_metric([v.model, v.version], v.inflight)
        yield from (requests, latency, batch, inflight)


class ServiceMetrics:
    def __init__(self, prometheus_registry: CollectorRegistry | None = None, arrivals: Arrivals | None = None
                 ) -> None:
        self.prometheus_registry = prometheus_registry or CollectorRegistry()
        r = self.prometheus_registry
        if arrivals is not None:
            arriving = Gauge("sluice_arriving_requests", "Inference requests accepted by the server and not yet "
                             "queued for a model (being received or decoded)", registry=r)
            arriving.set_function(lambda: arrivals.pending)
        # Kept for the life of the process: a version that comes back keeps counting from where it was.
        self._versions: dict[tuple[str, int], VersionMetrics] = {}
        r.register(_RequestCollector(self._versions))
        self.loaded = Gauge("sluice_loaded_versions", "Model versions loaded and serving", ["model"],
                            registry=r)
        self.loads = Counter("sluice_model_loads", "Model version loads by outcome",
                             ["model", "outcome"], registry=r)
        self.load_seconds = Histogram("sluice_model_load_seconds",
                                      "Time from load start to ready (session, checks, warm-up)",
                                      ["model"], registry=r)
        self.unloads = Counter("sluice_model_unloads", "Model versions unloaded", ["model"], registry=r)
        self.admin: AdminServer | None = None

    def for_version(self, model: str, version: int) -> VersionMetrics:
        key = (model, version)
        metrics = self._versions.get(key)
        if metrics is None:
            metrics = self._versions[key] = VersionMetrics(model, version)
        return metrics

    def serve(self, port: int, host: str, debug: DebugAccess = "auto",
              memory_extras: Callable[[], dict[str, Any]] | None = None,
              tls: Callable[[], ssl.SSLContext] | None = None) -> int:
        """Expose /metrics (and /debug/..., see mesh.observability.admin) over HTTP, or over HTTPS with a
        required client certificate given ``tls``; returns the bound port (useful with port 0).
        :meth:`close` stops it."""
        self.admin = AdminServer(self.prometheus_registry, debug=debug, component="sluice-service",
                                 memory_extras=memory_extras, tls=tls)
        return self.admin.start(host, port)

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None
