"""Prometheus metrics of the model service, on their own registry and HTTP port."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(slots=True)
class VersionMetrics:
    """Children bound to one (model, version) once at load, so the request path does no label lookups."""

    ok: Counter
    queue: Histogram
    compute: Histogram
    total: Histogram
    batch: Histogram
    inflight: Gauge
    metrics: ServiceMetrics
    model: str
    version: str

    def failed(self, code: str) -> None:
        self.metrics.requests.labels(self.model, self.version, code).inc()


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("sluice_requests", "Inference requests by model, version and gRPC code",
                                ["model", "version", "code"], registry=r)
        self.latency = Histogram("sluice_request_duration_seconds",
                                 "Inference request latency by phase (queue, compute, total)",
                                 ["model", "version", "phase"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sluice_batch_size", "Rows per ONNX Runtime call",
                                    ["model", "version"], buckets=_BATCH_BUCKETS, registry=r)
        self.inflight = Gauge("sluice_inflight_requests", "Inference requests being handled",
                              ["model", "version"], registry=r)
        self.loaded = Gauge("sluice_loaded_versions", "Model versions loaded and serving", ["model"],
                            registry=r)
        self.loads = Counter("sluice_model_loads", "Model version loads by outcome",
                             ["model", "outcome"], registry=r)
        self.load_seconds = Histogram("sluice_model_load_seconds",
                                      "Time from load start to ready (session, checks, warm-up)",
                                      ["model"], registry=r)
        self.unloads = Counter("sluice_model_unloads", "Model versions unloaded", ["model"], registry=r)

    def for_version(self, model: str, version: int) -> VersionMetrics:
        v = str(version)
        return VersionMetrics(
            ok=self.requests.labels(model, v, "OK"),
            queue=self.latency.labels(model, v, "queue"),
            compute=self.latency.labels(model, v, "compute"),
            total=self.latency.labels(model, v, "total"),
            batch=self.batch_size.labels(model, v),
            inflight=self.inflight.labels(model, v),
            metrics=self,
            model=model,
            version=v,
        )

    def serve(self, port: int, host: str) -> int:
        """Expose /metrics over HTTP; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])
