"""KServe v2 / Triton ``GRPCInferenceService``: convert, delegate to the data plane, convert back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.dataplane import DataPlane
from services.errors import ModelLoadError, SluiceError, UnsupportedError
from services.grpc import converters
from services.manager import ModelManager
from services.model import PLATFORM

Context = grpc.aio.ServicerContext[Any, Any]
log = structlog.get_logger(__name__)


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _unsupported(rpc: str, hint: str) -> UnsupportedError:
    return UnsupportedError(f"{rpc} is not supported by sluice; {hint}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, manager: ModelManager) -> None:
        self.plane = plane
        self.manager = manager

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.plane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        version = converters.parse_version(request.version)
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context
                             ) -> pb.ServerMetadataResponse:
        name, version, extensions = self.plane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context
                            ) -> pb.ModelMetadataResponse:
        meta = self.plane.model_metadata(request.name, converters.parse_version(request.version))
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=[str(v) for v in meta.versions],
            platform=PLATFORM,
            inputs=converters.tensor_metadata(meta.info.inputs),
            outputs=converters.tensor_metadata(meta.info.outputs),
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        headers = converters.routing_headers(context.invocation_metadata())
        response = await self.plane.infer(converters.request_from(request, _deadline(context), headers))
        return converters.response_to(response)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream run concurrently; a failed request answers with error_message
        (and its id) while the stream stays open, as Triton does."""
        results: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        headers = converters.routing_headers(context.invocation_metadata())

        async def one(message: pb.ModelInferRequest) -> None:
            try:
                response = await self.plane.infer(converters.request_from(message, _deadline(context), headers))
                await results.put(pb.ModelStreamInferResponse(infer_response=converters.response_to(response)))
            except Exception as exc:  # every request on the stream gets an answer, whatever happened
                if isinstance(exc, SluiceError):
                    text = str(exc)
                else:
                    reference = uuid.uuid4().hex[:12]
                    log.exception("unhandled error in a streamed request", reference=reference)
                    text = f"internal server error (reference {reference}); the server log has the details"
                await results.put(pb.ModelStreamInferResponse(
                    error_message=text,
                    infer_response=pb.ModelInferResponse(model_name=message.model_name,
                                                         model_version=message.model_version, id=message.id)))

        async def read() -> None:
            async for message in request_iterator:
                task = asyncio.create_task(one(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending), return_exceptions=True)
            await results.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
            await reader  # surfaces a reader failure to the interceptor
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        served = self.plane.resolve(request.name, converters.parse_version(request.version))
        return pb.ModelConfigResponse(config=converters.model_config(served))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context
                              ) -> pb.ModelStatisticsResponse:
        served = self.plane.statistics(request.name, converters.parse_version(request.version))
        return pb.ModelStatisticsResponse(model_stats=[converters.model_statistics(s) for s in served])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        rows = self.plane.repository_index()
        if request.ready:
            rows = [r for r in rows if r.state == "READY"]
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=r.model, version=str(r.version) if r.version else "", state=r.state, reason=r.reason)
            for r in rows
        ])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context
                                  ) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise _unsupported("RepositoryModelLoad with parameters",
                               "place the model files in the repository and load it by name")
        await self.manager.load_model(request.model_name)
        if not self.plane.model_ready(request.model_name, None):
            index = [r for r in self.plane.repository_index() if r.model == request.model_name]
            reasons = "; ".join(f"version {r.version}: {r.state} {r.reason}".strip() for r in index)
            raise ModelLoadError(
                f"model '{request.model_name}' did not load" + (f": {reasons}" if reasons else
                                                                ": no versions found in the repository"))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self.manager.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise _unsupported("system shared memory", "send tensors in raw_input_contents")

    SystemSharedMemoryRegister = SystemSharedMemoryStatus
    SystemSharedMemoryUnregister = SystemSharedMemoryStatus

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise _unsupported("CUDA shared memory", "send tensors in raw_input_contents")

    CudaSharedMemoryRegister = CudaSharedMemoryStatus
    CudaSharedMemoryUnregister = CudaSharedMemoryStatus

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        raise _unsupported("TraceSetting", "tracing is configured with OpenTelemetry settings at start-up")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        raise _unsupported("LogSettings", "set the log level with --log-level / SLUICE_LOG_LEVEL")
