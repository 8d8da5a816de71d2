"""KServe v2 / Triton ``GRPCInferenceService``: convert, delegate to the data plane, convert back.

Methods run on the gRPC server's handler threads. Inference runs right there (see
services/batcher.py); control operations (load, unload) are handed to the asyncio loop that owns
the model manager and awaited from the handler thread.

ModelInfer and ModelStreamInfer receive their requests as bytes (the methods in
:data:`RAW_REQUEST_METHODS` are registered with an identity deserializer) and parse them here, so
that a frame that does not parse is a client mistake answered INVALID_ARGUMENT, on a stream one
message's error instead of the end of the stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any

import grpc
import structlog

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services import routing
from services.dataplane import DataPlane
from services.errors import DeadlineExceededError, ModelLoadError, ServiceError, UnsupportedError
from services.grpc import converters
from services.manager import ModelManager
from services.model import PLATFORM
from services.streams import StreamGuard

Context = grpc.ServicerContext
_CONTROL_TIMEOUT = 600.0
log = structlog.get_logger(__name__)

RAW_REQUEST_METHODS = frozenset({"ModelInfer", "ModelStreamInfer"})
"""Methods whose requests reach the servicer as bytes (see the module docstring)."""


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _unsupported(rpc: str, hint: str) -> UnsupportedError:
    return UnsupportedError(f"{rpc} is not supported by sluice; {hint}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, manager: ModelManager, loop: asyncio.AbstractEventLoop,
                 streams: StreamGuard | None = None,
                 max_elements: int = converters.DEFAULT_MAX_ELEMENTS) -> None:
        self.plane = plane
        self.manager = manager
        self.loop = loop
        self.streams = streams or StreamGuard(limit=64, idle_timeout=60.0)
        """Bounds on open streams (the server passes its settings')."""
        self.max_elements = max_elements
        """Largest element count of one input: a request cannot carry more than its bytes."""

    def _control(self, operation: Coroutine[Any, Any, None], context: Context) -> None:
        """Run a model-manager operation on the loop and wait for it from this handler thread.

        Scheduled from an empty context: the loop task would otherwise inherit this RPC's log
        fields and hand them on to every task it starts (repository syncs, retries)."""
        future = contextvars.Context().run(asyncio.run_coroutine_threadsafe, operation, self.loop)
        remaining = context.time_remaining()
        timeout = _CONTROL_TIMEOUT if remaining is None else min(_CONTROL_TIMEOUT, remaining)
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceededError(
                f"the model operation did not finish within {timeout:.1f} s (the call's deadline, at most "
                f"{_CONTROL_TIMEOUT:.0f} s); it was cancelled") from None

    def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        version = routing.parse_version(request.version)
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, version))

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context
                             ) -> pb.ServerMetadataResponse:
        name, version, extensions = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context
                            ) -> pb.ModelMetadataResponse:
        meta = self.plane.model_metadata(routing.model_name(request.name, "name"),
                                         routing.parse_version(request.version))
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=[str(v) for v in meta.versions],
            platform=PLATFORM,
            inputs=converters.tensor_metadata(meta.info.inputs),
            outputs=converters.tensor_metadata(meta.info.outputs),
        )

    def ModelInfer(self, request: bytes | pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        message = converters.parse_request(request)
        headers = converters.routing_headers(context.invocation_metadata())
        response = self.plane.infer(converters.request_from(message, _deadline(context), headers,
                                                            self.max_elements))
        return converters.response_to(response)

    def ModelStreamInfer(self, request_iterator: Iterator[bytes | pb.ModelInferRequest], context: Context
                         ) -> Iterator[pb.ModelStreamInferResponse]:
        """Requests on one stream are answered in order; a failed request (one that does not even
        parse included) answers with error_message (and its id) while the stream stays open, as
        Triton does. The stream counts against the service's stream bound and ends after the idle
        timeout (services/streams.py)."""
        stream = self.streams.open(context)  # over the bound: RESOURCE_EXHAUSTED, no thread kept
        try:
            headers = converters.routing_headers(context.invocation_metadata())
            while True:
                try:
                    data = next(request_iterator)
                except StopIteration:
                    return
                except grpc.RpcError:
                    # The call is over (ended for idling, or cancelled by the client): nobody to answer.
                    if not stream.expired:
                        log.debug("stream_cancelled", by="client")
                    return
                stream.busy()
                answer = self._stream_answer(data, context, headers)
                stream.idle()  # waiting for the client to take the answer is idle too
                yield answer
                stream.idle()
        finally:
            self.streams.close(stream)

    def _stream_answer(self, data: bytes | pb.ModelInferRequest, context: Context, headers: tuple[str, str]
                       ) -> pb.ModelStreamInferResponse:
        message: pb.ModelInferRequest | None = None
        try:
            message = converters.parse_request(data)
            response = self.plane.infer(converters.request_from(message, _deadline(context), headers,
                                                                self.max_elements))
            return pb.ModelStreamInferResponse(infer_response=converters.response_to(response))
        except Exception as exc:  # every request on the stream gets an answer, whatever happened
            if isinstance(exc, ServiceError):
                text = str(exc)
            else:
                reference = uuid.uuid4().hex[:12]
                log.exception("stream_request_internal_error", reference=reference)
                text = f"internal server error (reference {reference}); the server log has the details"
            if message is None:
                return pb.ModelStreamInferResponse(error_message=text)
            # The names are echoed as sent (the client matches answers by them); the message clips them.
            return pb.ModelStreamInferResponse(
                error_message=text,
                infer_response=pb.ModelInferResponse(model_name=message.model_name,
                                                     model_version=message.model_version, id=message.id))

    def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        served = self.plane.resolve(routing.model_name(request.name, "name"),
                                    routing.parse_version(request.version))
        return pb.ModelConfigResponse(config=converters.model_config(served))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context
                              ) -> pb.ModelStatisticsResponse:
        name = routing.model_name(request.name, "name") if request.name else ""  # "" means every model
        served = self.plane.statistics(name, routing.parse_version(request.version))
        return pb.ModelStatisticsResponse(model_stats=[converters.model_statistics(s) for s in served])

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        rows = self.plane.repository_index()
        if request.ready:
            rows = [r for r in rows if r.state == "READY"]
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=r.model, version=str(r.version) if r.version else "", state=r.state, reason=r.reason)
            for r in rows
        ])

    def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context
                                  ) -> pb.RepositoryModelLoadResponse:
        # Refused before anything else when the admin surface is off, or the name is not a model
        # name (which would otherwise reach the file system: "../elsewhere", "/abs").
        self.manager.check_control("RepositoryModelLoad", request.model_name)
        if request.parameters:
            raise _unsupported("RepositoryModelLoad with parameters",
                               "place the model files in the repository and load it by name")
        self._control(self.manager.load_model(request.model_name), context)
        if not self.plane.model_ready(request.model_name, None):
            index = [r for r in self.plane.repository_index() if r.model == request.model_name]
            reasons = "; ".join(f"version {r.version}: {r.state} {r.reason}".strip() for r in index)
            raise ModelLoadError(
                f"model '{request.model_name}' did not load" + (f": {reasons}" if reasons else
                                                                ": no versions found in the repository"))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context
                                    ) -> pb.RepositoryModelUnloadResponse:
        self._control(self.manager.unload_model(request.model_name), context)
        return pb.RepositoryModelUnloadResponse()

    def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise _unsupported("system shared memory", "send tensors in raw_input_contents")

    SystemSharedMemoryRegister = SystemSharedMemoryStatus
    SystemSharedMemoryUnregister = SystemSharedMemoryStatus

    def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise _unsupported("CUDA shared memory", "send tensors in raw_input_contents")

    CudaSharedMemoryRegister = CudaSharedMemoryStatus
    CudaSharedMemoryUnregister = CudaSharedMemoryStatus

    def TraceSetting(self, request: Any, context: Context) -> Any:
        raise _unsupported("TraceSetting", "tracing is configured with OpenTelemetry settings at start-up")

    def LogSettings(self, request: Any, context: Context) -> Any:
        raise _unsupported("LogSettings", "set the log level with --log-level / SLUICE_LOG_LEVEL")
