"""The transport-free core of the service: inference, metadata, statistics, readiness.

gRPC servicers only convert protobuf to these calls and back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import structlog
from opentelemetry.trace import Tracer

from mesh.observability.logging import RequestFields, bind_request, request_fields
from mesh.protocol import clip
from services import __version__
from services.batcher import BatchResult
from services.catalog import ModelCatalog, VersionStatus
from services.errors import ServiceError, VersionRetiredError
from services.manager import ModelManager
from services.model import VersionInfo
from services.served import ServedVersion
from services.shadow import Shadow
from services.types import InferOutput, InferRequest, InferResponse

log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)

SERVER_NAME = "sluice"
_REROUTES = 3
"""How often a request whose version retired before it was queued is routed again."""
EXTENSIONS = ("model_repository", "statistics", "binary_tensor_data")


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[int]
    info: VersionInfo


class DataPlane:
    def __init__(self, catalog: ModelCatalog, manager: ModelManager, tracer: Tracer | None = None) -> None:
        self.catalog = catalog
        self.manager = manager
        self.tracer = tracer
        """Set when tracing is on: queue and inference spans per request."""
        self.started = False
        self.stopping = False
        self.shadow: Shadow | None = None
        """Set by the server: some answered requests are re-run on a candidate version."""

    # -- health -------------------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready once the start-up load pass finished and until shutdown begins.

        It never depends on a model that failed to load: that model is simply not ready.
        """
        return self.started and not self.stopping

    def model_ready(self, name: str, version: int | None) -> bool:
        try:
            self.catalog.resolve(name, version)
        except ServiceError:
            return False
        return not self.stopping

    # -- metadata -----------------------------------------------------------------------------
    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return SERVER_NAME, __version__, EXTENSIONS

    def model_metadata(self, name: str, version: int | None) -> ModelMetadata:
        served = self.catalog.resolve(name, version)
        return ModelMetadata(name, self.catalog.ready_versions(name), served.model.info())

    def resolve(self, name: str, version: int | None) -> ServedVersion:
        return self.catalog.resolve(name, version)

    def repository_index(self) -> list[VersionStatus]:
        return self.catalog.index()

    def statistics(self, name: str, version: int | None) -> list[ServedVersion]:
        if not name:
            return [s for versions in self.catalog.served().values() for s in versions.values()]
        if version is None:
            self.catalog.resolve(name, None)  # raises the right error for unknown models
            return list(self.catalog.served().get(name, {}).values())
        return [self.catalog.resolve(name, version)]

    # -- inference ----------------------------------------------------------------------------
    def infer(self, request: InferRequest) -> InferResponse:
        """Run one request; blocks the calling (gRPC handler) thread, never the event loop.

        A success is recorded (statistics, metrics) by the batch that answered it, a failure here.
        """
        started = time.monotonic()
        served = self.catalog.resolve(request.model, request.version)
        model = served.model
        fields = request_fields() or bind_request(RequestFields())  # called outside an RPC: bind here
        # The id is the client's string: clipped, so a log line cannot be made arbitrarily large.
        fields.model, fields.version, fields.request_id = model.name, model.version, clip(request.id)
        submitted_ns = time.time_ns() if self.tracer is not None else 0
        outputs = tuple(request.outputs)
        feeds = {tensor.name: tensor.data for tensor in request.inputs}
        try:
            rows = model.validate(request.inputs, request.outputs)
            for attempt in range(_REROUTES + 1):
                try:
                    result = served.batcher.submit(feeds, rows, outputs, request.deadline, started)
                    break
                except VersionRetiredError:
                    # Retired (replaced by a new copy, or unloaded) between routing and queueing,
                    # a window a hot reload opens under load: route again, so that no request is
                    # lost to a reload while another copy or version serves.
                    rerouted = self.catalog.resolve(request.model, request.version)
                    if rerouted is served or attempt == _REROUTES:
                        raise
                    served, model = rerouted, rerouted.model
                    rows = model.validate(request.inputs, request.outputs)
                    fields.model, fields.version = model.name, model.version
        except ServiceError as exc:
            served.record_failure(exc, started)
            raise
        if self.tracer is not None:
            self._spans(submitted_ns, result, model.name, model.version, rows)
        datatypes = model.output_datatypes
        names = model.selected_outputs(outputs)
        if _stdlib_log.isEnabledFor(logging.DEBUG):  # the cheap check keeps the hot path free of it
            log.debug("inference_done", rows=rows, batch_rows=result.batch_rows,
                      ms=round((time.monotonic() - started) * 1000, 3))
        response = InferResponse(model.name, model.version, request.id, [
            InferOutput(name, datatypes[name], array.shape, array)
            for name, array in zip(names, result.outputs, strict=True)
        ])
        if self.shadow is not None:
            # The answer is built: only a reference goes into the shadow queue (never blocks or raises).
            self.shadow.offer(model, clip(request.id), feeds=feeds, names=names, answers=result.outputs)
        return response

    def _spans(self, submitted_ns: int, result: BatchResult, model: str, version: int, rows: int) -> None:
        """Queue wait and ONNX Runtime call as children of the RPC's span, timed after the fact
        (the batch ran on another thread, possibly for several requests at once)."""
        assert self.tracer is not None
        queued_ns = submitted_ns + int(result.queue_seconds * 1e9)
        done_ns = queued_ns + int(result.compute_seconds * 1e9)
        attributes: dict[str, str | int] = {"sluice.model": model, "sluice.version": version, "sluice.rows": rows,
                      "sluice.batch_rows": result.batch_rows}
        self.tracer.start_span("sluice.queue", start_time=submitted_ns, attributes=attributes).end(queued_ns)
        self.tracer.start_span("onnxruntime.run", start_time=queued_ns, attributes=attributes).end(done_ns)
