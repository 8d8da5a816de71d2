"""The exception root of :mod:`mesh`: every error says exactly what was wrong."""

from __future__ import annotations


class MeshError(Exception):
    """Root of the errors raised by the registry library; the message is meant for an operator."""


class InvalidNameError(MeshError, ValueError):
    """A model name, version or instance id that cannot be used in a key."""


class InvalidKeyError(MeshError, ValueError):
    """A key under the prefix that does not follow the key schema."""


class InvalidDocumentError(MeshError, ValueError):
    """A JSON document (routing, status, instance record) that fails validation.

    ``problems`` lists every problem found, each naming the field, e.g.
    ``"weights: version 'x' is not a positive integer"``.
    """

    def __init__(self, what: str, problems: list[str]) -> None:
        self.what = what
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


class ConflictError(MeshError):
    """A compare-and-swap lost: someone else changed the key since it was read."""


class EtcdError(MeshError):
    """etcd answered with an error."""


class EtcdUnavailableError(EtcdError):
    """No endpoint could be reached (or answered) within the timeout."""


class EtcdAuthError(EtcdError):
    """etcd refused the credentials (user/password or client certificate)."""


class RevisionCompactedError(EtcdError):
    """A watch asked for history that etcd has compacted away."""

    def __init__(self, compacted_revision: int) -> None:
        self.compacted_revision = compacted_revision
        super().__init__(f"etcd history was compacted up to revision {compacted_revision}")


class LeaseLostError(EtcdError):
    """The lease expired or was revoked: keys written under it are gone."""


class EtcdRefusedError(EtcdError):
    """etcd refused this one request for what it carries (too large, invalid, not permitted): the
    same request fails again, the connection is fine, other requests go through."""
