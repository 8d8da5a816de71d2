"""A small OTLP trace receiver for local use: spans to a JSON-lines file, and a tree view of them.

``sluice up`` runs one so that a request's trace (Envoy → service → queue → ONNX Runtime) can be
seen without installing a collector; ``sluice traces`` prints the traces from the file.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else None


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext  # noqa: N802
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        lines: list[str] = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    lines.append(json.dumps({
                        "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(), "name": span.name, "service": service,
                        "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                    }))
        with self._lock, self._path.open("a") as handle:
            handle.write("".join(line + "\n" for line in lines))
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceReceiver:
    """An OTLP gRPC receiver on 127.0.0.1 writing spans to ``path``."""

    def __init__(self, path: Path, port: int = 0) -> None:
        self.path = path
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Receiver(path), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=1.0).wait(2.0)


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    @property
    def millis(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def read_spans(path: Path) -> list[Span]:
    spans: list[Span] = []
    for line in path.read_text().splitlines():
        try:
            spans.append(Span(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
    return spans


def traces(spans: Iterable[Span]) -> dict[str, list[Span]]:
    """trace id → its spans, traces ordered by start time."""
    grouped: dict[str, list[Span]] = defaultdict(list)
    for span in spans:
        grouped[span.trace_id].append(span)
    return dict(sorted(grouped.items(), key=lambda item: min(s.start_ns for s in item[1])))


def render_trace(trace_id: str, spans: list[Span]) -> str:
    """A trace as an indented tree: service, span name, duration, the sluice attributes."""
    by_parent: dict[str, list[Span]] = defaultdict(list)
    ids = {s.span_id for s in spans}
    for span in spans:
        by_parent[span.parent_span_id if span.parent_span_id in ids else ""].append(span)
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    lines = [f"trace {trace_id}  {(end - start) / 1e6:.2f} ms"]

    def walk(parent: str, depth: int) -> None:
        for span in sorted(by_parent.get(parent, []), key=lambda s: s.start_ns):
            extra = " ".join(f"{k.removeprefix('sluice.')}={v}" for k, v in sorted(span.attributes.items())
                             if k.startswith("sluice."))
            offset = (span.start_ns - start) / 1e6
            lines.append(f"  {'  ' * depth}{span.service:<15} {span.name:<45} +{offset:7.2f} ms "
                         f"{span.millis:8.2f} ms  {extra}".rstrip())
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)
