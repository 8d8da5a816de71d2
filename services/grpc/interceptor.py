"""The one place where service errors become gRPC status codes.

Clients see the message of a :class:`SluiceError` (it names what was wrong); any other exception
is logged with its traceback and answered INTERNAL with a generic message and a reference.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from mesh.tracing import current_ids
from services.errors import SluiceError, status_name

log = structlog.get_logger(__name__)


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_name(exc)]


async def _abort(exc: Exception, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    if isinstance(exc, SluiceError):
        await context.abort(grpc_code(exc), str(exc))
    reference = uuid.uuid4().hex[:12]
    log.exception("unhandled error in RPC", method=method, reference=reference)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal server error (reference {reference}); "
                                                  "the server log has the details")


def _bind_context(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Per-RPC log fields (each RPC runs in its own task, so its context variables are its own)."""
    fields: dict[str, str] = {"rpc": method.rpartition("/")[2], "peer": context.peer()}
    ids = current_ids()
    if ids is not None:
        fields["trace_id"], fields["span_id"] = ids
    structlog.contextvars.bind_contextvars(**fields)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes for unary and streaming handlers alike."""

    def __init__(self) -> None:
        self._cache: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        wrapped = self._wrap(handler, method)
        self._cache[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                _bind_context(method, context)
                try:
                    return await inner(request, context)
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await _abort(exc, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream: Any = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
                                    ) -> AsyncIterator[Any]:
                _bind_context(method, context)
                try:
                    async for response in inner_stream(requests, context):
                        yield response
                except Exception as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await _abort(exc, context, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
