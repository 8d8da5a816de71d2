"""The one place where service errors become gRPC status codes.

Clients see the message of a :class:`SluiceError` (it names what was wrong); any other exception
is logged with its traceback and answered INTERNAL with a generic message and a reference.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import structlog

from mesh.tracing import current_ids
from services.errors import SluiceError, status_name

log = structlog.get_logger(__name__)


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_name(exc)]


def _abort(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    """``context.abort`` raises, ending the RPC with the status; it never returns."""
    if isinstance(exc, SluiceError):
        context.abort(grpc_code(exc), str(exc))
    reference = uuid.uuid4().hex[:12]
    log.exception("unhandled error in RPC", method=method, reference=reference)
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error (reference {reference}); "
                                            "the server log has the details")


def _bind_context(method: str, context: grpc.ServicerContext) -> None:
    """Per-RPC log fields. Handler threads are reused, so the previous RPC's fields go first."""
    structlog.contextvars.clear_contextvars()
    fields: dict[str, str] = {"rpc": method.rpartition("/")[2], "peer": context.peer()}
    ids = current_ids()
    if ids is not None:
        fields["trace_id"], fields["span_id"] = ids
    structlog.contextvars.bind_contextvars(**fields)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes for unary and streaming handlers alike."""

    def __init__(self) -> None:
        self._cache: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._cache:
            return self._cache[method]
        handler = continuation(handler_call_details)
        wrapped = None if handler is None else self._wrap(handler, method)
        self._cache[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            inner: Any = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                _bind_context(method, context)
                try:
                    return inner(request, context)
                except Exception as exc:  # this is the translation point
                    if cast(Any, context).code() is not None:  # aborted already (context.abort raised)
                        raise
                    _abort(exc, context, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream: Any = handler.stream_stream

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                _bind_context(method, context)
                try:
                    yield from inner_stream(requests, context)
                except Exception as exc:
                    if cast(Any, context).code() is not None:
                        raise
                    _abort(exc, context, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
