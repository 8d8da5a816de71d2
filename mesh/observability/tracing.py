"""OpenTelemetry set-up shared by every sluice process: one TracerProvider, off by default.

Spans go to an OTLP gRPC collector when an endpoint is configured; W3C ``traceparent`` is the
propagation format (Envoy's OpenTelemetry tracer speaks it too), so a request's gateway span and
its service spans share one trace.
"""

from __future__ import annotations

import structlog
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

log = structlog.get_logger(__name__)


def configure_tracing(service_name: str, endpoint: str | None, sampling_ratio: float = 1.0,
                      instance: str | None = None) -> TracerProvider | None:
    """Install the process's TracerProvider; returns None (and leaves tracing off) without an endpoint."""
    if not endpoint:
        return None
    attributes = {"service.name": service_name}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(
        resource=Resource.create(attributes),
        # Follow the caller's decision (Envoy's) when there is one; sample new traces by ratio.
        sampler=ParentBased(TraceIdRatioBased(sampling_ratio)),
    )
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure),
                                                   schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    log.info("tracing_on", endpoint=endpoint, sampling_ratio=sampling_ratio, service_name=service_name)
    return provider


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span as hex, for log lines; None outside a trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def shutdown_tracing(provider: TracerProvider | None) -> None:
    if provider is not None:
        provider.shutdown()
