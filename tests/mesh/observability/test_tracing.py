"""One trace from Envoy to ONNX Runtime: a real gateway, a real service, an in-process OTLP receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from examples.build_models import build_iris
from tests.fixtures.envoy import start_gateway
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle

pytestmark = [pytest.mark.e2e]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Collects every exported span as (service name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object  # noqa: N802
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(s, span) for s, span in self.spans if span.trace_id == trace_id]  # type: ignore[attr-defined]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.mark.timeout(180)
def test_one_trace_from_envoy_to_onnxruntime(tmp_path: Path, etcd: EtcdServer, receiver: tuple[Receiver, str],
                                              start_service: Callable[..., ServiceHandle]) -> None:
    collector, endpoint = receiver
    repo = tmp_path / "repo"
    build_iris(repo)
    service = start_service(repo, "--etcd", etcd.endpoint, "--instance-id", "traced", "--otlp-endpoint",
                            f"http://{endpoint}", "--log-level", "debug", "--deregister-grace", "0")
    gateway = start_gateway(etcd, "/sluice/", tmp_path / "gw", "--otlp-endpoint", endpoint)
    try:
        def routed() -> bool:
            try:
                with triton_grpc.InferenceServerClient(gateway.address) as client:
                    return bool(client.is_model_ready("iris", headers={"x-model-name": "iris"}))
            except Exception:
                return False

        wait_for(routed, 60, "iris routed through Envoy")
        x = triton_grpc.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        with triton_grpc.InferenceServerClient(gateway.address) as client:
            result = client.infer("iris", [x], headers={"x-model-name": "iris"}, request_id="traced-request-1")
        assert result.get_response().id == "traced-request-1"

        # The service's infer span: find the trace it belongs to.
        def infer_trace() -> bytes | None:
            with collector.lock:
                for service_name, span in collector.spans:
                    if service_name == "sluice-service" and span.name.endswith("/ModelInfer"):  # type: ignore[attr-defined]
                        return bytes(span.trace_id)  # type: ignore[attr-defined]
            return None

        wait_for(lambda: infer_trace() is not None, 30, "the service's ModelInfer span at the collector")
        trace_id = infer_trace()
        assert trace_id is not None

        def complete() -> bool:
            names = {(s, span.name) for s, span in collector.by_trace(trace_id)}  # type: ignore[attr-defined]
            return any(s == "sluice-gateway" for s, _ in names) and {("sluice-service", "sluice.queue"),
                                                                     ("sluice-service", "onnxruntime.run")} <= names

        wait_for(complete, 30, "Envoy's span and the service's queue/onnxruntime spans in the same trace")
        spans = collector.by_trace(trace_id)
        by_name = {span.name: span for _, span in spans}  # type: ignore[attr-defined]
        envoy_spans = [span for s, span in spans if s == "sluice-gateway"]
        server = next(span for name, span in by_name.items() if name.endswith("/ModelInfer"))
        # Parentage: Envoy's span → the service's server span → queue and inference spans.
        assert server.parent_span_id in {bytes(span.span_id) for span in envoy_spans}  # type: ignore[attr-defined]
        for child in ("sluice.queue", "onnxruntime.run"):
            assert by_name[child].parent_span_id == server.span_id, child  # type: ignore[attr-defined]
        attributes = {a.key: a.value for a in by_name["onnxruntime.run"].attributes}  # type: ignore[attr-defined]
        assert attributes["sluice.model"].string_value == "iris"
        assert attributes["sluice.version"].int_value == 2

        # The service's log lines for that request carry the same trace id.
        hex_id = trace_id.hex()

        def logged() -> list[dict[str, object]]:
            lines = [json.loads(line) for line in service.process.log_text().splitlines() if line.startswith("{")]
            return [line for line in lines if line.get("trace_id") == hex_id]

        wait_for(lambda: bool(logged()), 10, "a service log line with the trace id")
        line = logged()[0]
        assert line["model"] == "iris" and line["request_id"] == "traced-request-1" and line["version"] == 2
        # And Envoy's access log names it too.
        access_log = tmp_path / "gw" / "access.log"
        wait_for(lambda: hex_id in access_log.read_text(), 10, "Envoy's access log line with the trace id")
        # Health checks are not traced.
        with collector.lock:
            assert not [span for _, span in collector.spans if "Health" in span.name]  # type: ignore[attr-defined]
    finally:
        gateway.stop()
