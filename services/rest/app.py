"""The KServe v2 REST application (ASGI): routes, bodies, compression and the error table.

Inference (decode, the batcher, encode) runs on a thread of the REST executor, never on the event
loop, and counts as an arrival for the batch leaders (services/arrivals.py), as gRPC's does.
"""

from __future__ import annotations

import asyncio
import contextvars
import gzip
import json
import uuid
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Final

import structlog

from mesh.observability.logging import RequestFields, bind_request
from mesh.protocol import MODEL_HEADER, VERSION_HEADER, clip
from services import routing
from services.dataplane import DataPlane
from services.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
    ServiceError,
    status_name,
)
from services.grpc import converters
from services.manager import ModelManager
from services.model import PLATFORM
from services.rest import codec

log = structlog.get_logger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

HTTP_STATUS: Final[dict[str, int]] = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503,
    "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504, "PERMISSION_DENIED": 403, "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
}
"""gRPC status (services/errors.py's table) -> HTTP status, as KServe and Triton answer them."""
_CONTROL_TIMEOUT: Final = 600.0
_INLINE_COMPRESS: Final = 64 * 1024
"""Answers up to this size (metadata, health) compress on the event loop; larger ones on a thread."""


class PayloadTooLargeError(InvalidRequestError):
    """A body (or what it decompresses to) over the service's max message size: 413."""


class _Answer:
    __slots__ = ("body", "encoded", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or [(b"content-type", b"application/json")]
        self.encoded = False
        """Whether ``body`` is final, Content-Encoding header included (compressed on an executor thread)."""

    def compressed(self, accept: str) -> _Answer:
        """This answer with its body compressed as ``accept`` asks; called on an executor thread."""
        if self.body:
            self.body, encoding = _compress(self.body, accept)
            if encoding is not None:
                self.headers = [*self.headers, (b"content-encoding", encoding)]
        self.encoded = True
        return self


def _json(doc: Any, status: int = 200) -> _Answer:
    return _Answer(status, json.dumps(doc, separators=(",", ":")).encode())


def _error(status: int, text: str) -> _Answer:
    return _json({"error": text}, status)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding``; at most ``limit`` bytes (zip bombs stop there)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        wbits = 31
    elif encoding == "deflate":  # zlib-wrapped as tritonclient sends it, or raw deflate
        wbits = 15 if body[:1] == b"\x78" else -15
    else:
        raise InvalidRequestError(f"Content-Encoding '{clip(encoding)}' is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequestError(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLargeError(
            f"request body decompresses to more than {limit} bytes, the service's max message size")
    if not inflater.eof:
        raise InvalidRequestError(f"request body ends inside its {encoding} data (truncated)")
    return out


def _compress(body: bytes, accept: str) -> tuple[bytes, bytes | None]:
    tokens = {t.split(";")[0].strip().lower() for t in accept.split(",")}
    if "gzip" in tokens:
        return gzip.compress(body, 1), b"gzip"
    if "deflate" in tokens:
        return zlib.compress(body, 1), b"deflate"
    return body, None


class RestApp:
    """ASGI application over the service's data plane."""

    def __init__(self, plane: DataPlane, manager: ModelManager, executor: Executor, *, max_bytes: int,
                 max_in_flight: int) -> None:
        self.plane, self.manager, self.executor = plane, manager, executor
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.control_timeout = _CONTROL_TIMEOUT
        """Seconds a repository load or unload request waits before answering 504 (the work goes on)."""
        self.control_tasks: set[asyncio.Future[None]] = set()
        """Loads and unloads still running (one answered 504 goes on here); held so none is collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rpartition(".")[2]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            answer = await self._dispatch(scope, receive, headers)
        except PayloadTooLargeError as exc:
            answer = _error(413, str(exc))
        except ServiceError as exc:
            answer = _error(HTTP_STATUS.get(status_name(exc), 500), str(exc))
        except Exception:
            reference = uuid.uuid4().hex[:12]
            log.exception("rest_internal_error", path=clip(scope.get("path", "")), reference=reference)
            answer = _error(500, f"internal server error (reference {reference}); the server log has the details")
        accept = headers.get("accept-encoding", "")
        if answer.encoded or not answer.body:
            body, encoding = answer.body, None
        elif len(answer.body) <= _INLINE_COMPRESS:
            body, encoding = _compress(answer.body, accept)
        else:  # a large answer (statistics, a repository index) compresses off the event loop
            body, encoding = await asyncio.get_running_loop().run_in_executor(
                self.executor, _compress, answer.body, accept)
        out = list(answer.headers)
        if encoding is not None:
            out.append((b"content-encoding", encoding))
        out.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": body})

    async def _body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        """A control or index body, decompressed on an executor thread."""
        raw = await self._raw_body(receive, headers)
        encoding = headers.get("content-encoding", "")
        if encoding.strip().lower() in ("", "identity"):
            return raw
        return await asyncio.get_running_loop().run_in_executor(self.executor, decompress, raw, encoding,
                                                                self.max_bytes)

    async def _raw_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        """The body as sent (still compressed), at most the max message size."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLargeError(
                f"request body of {declared} bytes is over {self.max_bytes} bytes, the service's max message size")
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequestError("the client closed the connection before the body was complete")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                raise PayloadTooLargeError(
                    f"request body is over {self.max_bytes} bytes, the service's max message size")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _dispatch(self, scope: Scope, receive: Receive, headers: dict[str, str]) -> _Answer:
        method, path = scope["method"], scope["path"]
        parts = path.rstrip("/").split("/")[1:] if path != "/" else []
        if not parts or parts[0] != "v2":
            raise _not_found(method, path)
        rest = parts[1:]
        get, post = method in ("GET", "HEAD"), method == "POST"
        if not rest and get:
            name, version, extensions = self.plane.server_metadata()
            return _json({"name": name, "version": version, "extensions": list(extensions)})
        if rest == ["health", "live"] and get:
            return _Answer(200 if self.plane.live() else 503, b"")
        if rest == ["health", "ready"] and get:
            return _Answer(200 if self.plane.ready() else 503, b"")
        if rest == ["repository", "index"] and post:
            doc = codec.parse_json(await self._body(receive, headers) or b"{}")
            ready = isinstance(doc, dict) and doc.get("ready") is True
            return _json([{"name": r.model, "version": str(r.version) if r.version else "", "state": r.state,
                           "reason": r.reason} for r in self.plane.repository_index()
                          if not ready or r.state == "READY"])
        if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[3] in ("load", "unload") and post:
            return await self._control(rest[2], rest[3], await self._body(receive, headers))
        if len(rest) >= 2 and rest[0] == "models":
            name = routing.model_name(rest[1], "model name in the path")
            tail = rest[2:]
            version_text = ""
            if len(tail) >= 2 and tail[0] == "versions":
                version_text, tail = tail[1], tail[2:]
            action = tail[0] if len(tail) == 1 else ("" if not tail else None)
            model_headers = (headers.get(MODEL_HEADER, ""), headers.get(VERSION_HEADER, ""))
            if action == "infer" and post:
                return await self._infer(name, version_text, model_headers, receive, headers)
            if action is not None and get:
                pinned = routing.routed_version(name, version_text, model_headers)
                return self._model_get(name, pinned, action, method, path)
        raise _not_found(method, path)

    def _model_get(self, name: str, version: int | None, action: str, method: str, path: str) -> _Answer:
        if action == "":
            meta = self.plane.model_metadata(name, version)
            return _json({"name": meta.name, "versions": [str(v) for v in meta.versions], "platform": PLATFORM,
                          "inputs": [_spec(s) for s in meta.info.inputs],
                          "outputs": [_spec(s) for s in meta.info.outputs]})
        if action == "ready":
            ready = self.plane.model_ready(name, version)
            return _json({"name": name, "ready": ready}, 200 if ready else 503)
        if action == "config":
            return _json(message_json(converters.model_config(self.plane.resolve(name, version))))
        if action == "stats":
            served = self.plane.statistics(name, version)
            return _json({"model_stats": [message_json(converters.model_statistics(s)) for s in served]})
        raise _not_found(method, path)

    async def _control(self, name: str, operation: str, body: bytes) -> _Answer:
        rpc = "RepositoryModelLoad" if operation == "load" else "RepositoryModelUnload"
        self.manager.check_control(rpc, name)
        doc = codec.parse_json(body) if body.strip() else {}
        if isinstance(doc, dict) and doc.get("parameters"):
            raise InvalidRequestError(f"{rpc} with parameters is not supported by sluice; place the model "
                                      "files in the repository and load it by name")
        work = self.manager.load_model(name) if operation == "load" else self.manager.unload_model(name)
        task = contextvars.Context().run(asyncio.ensure_future, work)  # no request fields for the loop's tasks
        self.control_tasks.add(task)
        task.add_done_callback(self.control_tasks.discard)
        try:
            # Shielded: a timeout (or this request's end) must not cancel a load halfway through.
            await asyncio.wait_for(asyncio.shield(task), self.control_timeout)
        except TimeoutError:
            raise DeadlineExceededError(
                f"{rpc} of model '{name}' did not finish within {self.control_timeout:g} s; it goes on in the "
                "service: POST /v2/repository/index shows its state") from None
        if operation == "load" and not self.plane.model_ready(name, None):
            reasons = "; ".join(f"version {r.version}: {r.state} {r.reason}".strip()
                                for r in self.plane.repository_index() if r.model == name)
            raise InvalidRequestError(f"model '{name}' did not load: {reasons or 'no versions found'}")
        return _Answer(200, b"")

    async def _infer(self, name: str, version_text: str, model_headers: tuple[str, str], receive: Receive,
                     headers: dict[str, str]) -> _Answer:
        # The slot is taken before the body is read: over the bound, a request costs no body in memory.
        if self.in_flight >= self.max_in_flight:
            raise QueueFullError(f"the service has {self.in_flight} REST requests in flight, its bound; retry later")
        self.in_flight += 1
        try:
            body = await self._raw_body(receive, headers)
            arrivals = self.plane.catalog.arrivals
            arrivals.enter()
            try:
                future = asyncio.get_running_loop().run_in_executor(
                    self.executor, self._infer_here, name, version_text, model_headers, body, headers)
            except BaseException:
                arrivals.cancel()
                raise
            return await future
        finally:
            self.in_flight -= 1

    def _infer_here(self, name: str, version_text: str, model_headers: tuple[str, str], body: bytes,
                    headers: dict[str, str]) -> _Answer:
        """On a REST executor thread: decompress, decode, run through the batcher, encode, compress."""
        arrivals = self.plane.catalog.arrivals
        arrivals.begin()
        bind_request(RequestFields("REST ModelInfer"))
        try:
            body = decompress(body, headers.get("content-encoding", ""), self.max_bytes)
            head, binary = codec.split_body(body, headers.get(codec.HEADER_LENGTH))
            request, answer = codec.request_from(codec.parse_json(head), binary, name, version_text, model_headers,
                                                 max_elements=self.max_bytes)
            response = self.plane.infer(request)
        finally:
            arrivals.arrived()
        out, json_length = codec.response_body(response, answer)
        accept = headers.get("accept-encoding", "")
        if json_length is None:
            return _Answer(200, out).compressed(accept)
        return _Answer(200, out, [(b"content-type", b"application/octet-stream"),
                                  (codec.HEADER_LENGTH.encode(), str(json_length).encode())]).compressed(accept)


def _spec(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _not_found(method: str, path: str) -> ServiceError:
    return ModelNotFoundError(f"no KServe v2 endpoint {method} {clip(path)}")


def message_json(message: Any) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP JSON: field names as in the proto, integers as numbers
    (protobuf's own JSON writes 64-bit integers as strings), enums by name, zero values kept."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        repeated = field.label == field.LABEL_REPEATED
        if not repeated and (field.containing_oneof is not None or field.message_type is not None) \
                and not message.HasField(field.name):
            continue
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _single(inner, item) for key, item in value.items()}
        elif repeated:
            out[field.name] = [_single(field, item) for item in value]
        else:
            out[field.name] = _single(field, value)
    return out


def _single(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
