"""The service's exception root. Transport-free: the gRPC layer maps these to status codes."""

from __future__ import annotations


class ServiceError(Exception):
    """Root of every error a client or operator can cause; the message is shown to the client."""


class InvalidRequestError(ServiceError):
    """The request is malformed: wrong input name, shape, datatype, byte length, framing…"""


class ModelNotFoundError(ServiceError):
    """No such model, or no such version of it."""


class ModelNotReadyError(ServiceError):
    """The model (version) exists but cannot serve right now (loading, draining, failed)."""


class VersionRetiredError(ModelNotReadyError):
    """The version stopped taking requests (replaced or unloaded) after the request was routed to
    it: the data plane routes the request again."""


class QueueFullError(ServiceError):
    """The model's request queue is at its limit."""


class StreamLimitError(ServiceError):
    """A ModelStreamInfer stream over the service's bound on open streams (max_streams)."""


class PermissionDeniedError(ServiceError):
    """The operation is disabled on this service (an admin surface that was not enabled)."""


class DeadlineExceededError(ServiceError):
    """The request's deadline passed before it could run."""


class UnsupportedError(ServiceError):
    """The operation or datatype is not supported by this server or runtime."""


class ModelLoadError(ServiceError):
    """A model version could not be loaded; the reason says why.

    ``transient`` marks failures worth retrying without a file change (out of memory, files that
    changed while loading, I/O errors); the others wait until the files change again.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class InferenceError(ServiceError):
    """ONNX Runtime failed while running a request that passed validation."""


# The one table from errors to status codes (canonical gRPC code names). The gRPC interceptor
# applies it; metrics label failures with it. Anything not listed here is INTERNAL.
STATUS_CODES: dict[type[ServiceError], str] = {
    InvalidRequestError: "INVALID_ARGUMENT",
    ModelNotFoundError: "NOT_FOUND",
    ModelNotReadyError: "UNAVAILABLE",
    QueueFullError: "RESOURCE_EXHAUSTED",
    StreamLimitError: "RESOURCE_EXHAUSTED",
    PermissionDeniedError: "PERMISSION_DENIED",
    DeadlineExceededError: "DEADLINE_EXCEEDED",
    UnsupportedError: "UNIMPLEMENTED",
    ModelLoadError: "FAILED_PRECONDITION",
    InferenceError: "INTERNAL",
}


def status_name(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return "INTERNAL"
