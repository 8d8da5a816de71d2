"""Typed JSON documents stored under the key schema, and the one routing-document validator.

The CLI, the gateway controller and the docs all go through :func:`parse_routing_document`, so a
document that one accepts, all accept, with the same error messages.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mesh.errors import InvalidDocumentError, InvalidNameError
from mesh.protocol import clip
from mesh.registry.keys import validate_instance_id, validate_model_name, validate_version

MAX_WEIGHT = 1_000_000
INSTANCE_RECORD_MAX = 64 * 1024
"""Largest instance record (JSON bytes) a service writes. etcd refuses requests over 1.5 MiB by
default, and every gateway and mesh-sync holds and re-reads every record: services refuse to load
a version whose record would be larger (its labels, in practice) instead of failing to register."""
_HEADER_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class InstanceState(str, enum.Enum):
    """Lifecycle of one registered instance; the gateway routes only to ``serving``."""

    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    """The version failed to load in this process (``error`` says why): registered so that
    ``sluice status`` shows it; never routed to."""


ERROR_MAX = 500
"""Characters of a failed load's reason kept in an instance record (the service logs all of it)."""


def _format_validation_error(exc: ValidationError) -> list[str]:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "document"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return problems


def _load_json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidDocumentError(what, [f"not valid JSON: {exc}"]) from exc
    except RecursionError as exc:  # anyone who can write to etcd can write a document 100,000 deep
        raise InvalidDocumentError(what, ["not valid JSON: nested too deeply"]) from exc


_Model = TypeVar("_Model", bound=BaseModel)


def _parse(cls: type[_Model], raw: bytes | str, what: str) -> _Model:
    """``raw`` JSON as a ``cls``, or InvalidDocumentError listing every problem."""
    data = _load_json(raw, what)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise InvalidDocumentError(what, _format_validation_error(exc)) from exc


class InstanceRecord(BaseModel):
    """One process serving one model version, at ``models/<model>/instances/<version>/<instance-id>``.

    Unknown fields are ignored when reading, so newer services can add fields without breaking
    older gateways.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    address: str
    """``host:port`` of the gRPC endpoint that serves this version."""
    rest_address: str | None = None
    """``host:port`` of the KServe v2 REST (HTTP/1.1) endpoint of the same process; None: no REST."""
    admin_address: str | None = None
    """``host:port`` of the same process's admin port (``/metrics``, ``/debug/...``: ``sluice debug``);
    None: none, or an older service."""
    model: str
    version: int = Field(ge=1)
    instance_id: str
    state: InstanceState = InstanceState.SERVING
    sha256: str | None = None
    """Hex digest of the served ``model.onnx``."""
    started: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    """When the version started serving; unix seconds or ISO 8601 are accepted, ISO is written."""
    labels: dict[str, str] = Field(default_factory=dict)
    error: str | None = Field(default=None, max_length=ERROR_MAX)
    """Why the version failed to load, clipped to :data:`ERROR_MAX`: with state ``failed``, nothing
    serves; with ``serving``, its newest files failed to load and the older copy serves on."""

    @field_validator("address", "rest_address", "admin_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        return validate_model_name(value)  # InvalidNameError is a ValueError: pydantic reports it as such

    @field_validator("instance_id")
    @classmethod
    def _check_instance_id(cls, value: str) -> str:
        return validate_instance_id(value)  # InvalidNameError is a ValueError: pydantic reports it as such

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256_RE.fullmatch(value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @field_validator("started")
    @classmethod
    def _assume_utc(cls, value: datetime) -> datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def size_problem(self) -> str | None:
        """Why this record is too large to register (None when it fits :data:`INSTANCE_RECORD_MAX`)."""
        size = len(self.to_json())
        if size <= INSTANCE_RECORD_MAX:
            return None
        return (f"its etcd instance record would be {size} bytes, more than {INSTANCE_RECORD_MAX}; "
                f"labels take {len(json.dumps(self.labels))} of them")

    @classmethod
    def from_json(cls, raw: bytes | str) -> InstanceRecord:
        return _parse(cls, raw, "instance record")


ACCESS_CLAIM_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
"""A JWT claim name the gateway may authorize on: what the access rule's ``claim`` must match."""
ACCESS_ALLOW_MAX = 64
"""Most values in an access rule's ``allow`` list (each is one matcher in Envoy's RBAC policy)."""
ACCESS_VALUE_MAX = 128
"""Longest value in an access rule's ``allow`` list."""
ACCESS_FIELDS = ("claim", "allow")


class AccessRule(BaseModel):
    """Who may call a model through the gateway: callers whose JWT claim ``claim`` holds (or is)
    one of ``allow``; ``"*"`` in ``allow`` means any caller with a valid token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    claim: str
    allow: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "allow": list(self.allow)}


def parse_access_rule(data: Any, problems: list[str]) -> AccessRule | None:
    """The ``access`` field of a routing document, or None with what is wrong added to ``problems``."""
    if not isinstance(data, Mapping):
        problems.append(f"access: must be an object {{\"claim\": …, \"allow\": […]}}, got {type(data).__name__}")
        return None
    found = len(problems)
    for field in data:
        if field not in ACCESS_FIELDS:
            problems.append(f"access: unknown field {clip(str(field))!r} (allowed: {', '.join(ACCESS_FIELDS)})")
    claim = data.get("claim")
    if not isinstance(claim, str) or not ACCESS_CLAIM_RE.fullmatch(claim):
        shown = repr(clip(claim)) if isinstance(claim, str) else repr(claim)[:ACCESS_VALUE_MAX]
        problems.append(f"access.claim: {shown} is not a claim name (1 to 64 of A-Z a-z 0-9 _ . : -, "
                        "not starting with . : -)")
    allow = data.get("allow")
    values: list[str] = []
    if not isinstance(allow, list) or not allow:
        problems.append("access.allow: must be a non-empty list of strings")
    elif len(allow) > ACCESS_ALLOW_MAX:
        problems.append(f"access.allow: at most {ACCESS_ALLOW_MAX} values, got {len(allow)}")
    else:
        for value in allow:
            if not isinstance(value, str) or not value or len(value) > ACCESS_VALUE_MAX \
                    or not value.isprintable():
                shown = repr(clip(value)) if isinstance(value, str) else repr(value)[:ACCESS_VALUE_MAX]
                problems.append(f"access.allow: {shown} is not a value: 1 to {ACCESS_VALUE_MAX} printable "
                                "characters")
            elif value not in values:
                values.append(value)
    if len(problems) > found or not isinstance(claim, str):
        return None
    return AccessRule.model_construct(claim=claim, allow=tuple(values))


class RoutingDocument(BaseModel):
    """How traffic of one model splits over its versions, at ``models/<model>/routing``.

    Build it through :func:`parse_routing_document` (or :meth:`from_weights`), which validate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[int, int]
    """Version → relative weight (≥ 0); the weights sum to more than 0."""
    sticky_header: str | None = None
    """Requests with the same value of this header go to the same version."""
    default_version: int | None = None
    """Takes all traffic when no weighted version has serving instances."""
    access: AccessRule | None = None
    """Who may call the model when the gateway authenticates callers (JWT); None: the gateway's
    default rule (the caller's access claim lists the model)."""

    @classmethod
    def from_weights(cls, weights: Mapping[Any, Any], sticky_header: str | None = None,
                     default_version: int | None = None, access: AccessRule | None = None) -> RoutingDocument:
        document: dict[str, Any] = {"weights": {str(k): v for k, v in weights.items()}}
        if sticky_header is not None:
            document["sticky_header"] = sticky_header
        if default_version is not None:
            document["default_version"] = default_version
        if access is not None:
            document["access"] = access.to_dict()
        return parse_routing_document(document)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"weights": {str(v): w for v, w in sorted(self.weights.items())}}
        if self.sticky_header is not None:
            document["sticky_header"] = self.sticky_header
        if self.default_version is not None:
            document["default_version"] = self.default_version
        if self.access is not None:
            document["access"] = self.access.to_dict()
        return document

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    def percentages(self) -> dict[int, float]:
        total = sum(self.weights.values())
        return {version: 100.0 * weight / total for version, weight in sorted(self.weights.items())}


ROUTING_FIELDS = ("weights", "sticky_header", "default_version", "access")


def parse_routing_document(raw: bytes | str | Mapping[str, Any]) -> RoutingDocument:
    """Validate a routing document (JSON text or already-decoded mapping).

    Raises :class:`InvalidDocumentError` listing every problem, each naming its field.
    """
    data = _load_json(raw, "routing document") if isinstance(raw, (bytes, str)) else raw
    if not isinstance(data, Mapping):
        raise InvalidDocumentError("routing document", [f"must be a JSON object, got {type(data).__name__}"])
    problems: list[str] = []
    for field in data:
        if field not in ROUTING_FIELDS:
            problems.append(f"unknown field {clip(str(field))!r} (allowed: {', '.join(ROUTING_FIELDS)})")

    weights: dict[int, int] = {}
    raw_weights = data.get("weights")
    if raw_weights is None:
        problems.append("weights: required (an object of version -> weight)")
    elif not isinstance(raw_weights, Mapping):
        problems.append(f"weights: must be an object of version -> weight, got {type(raw_weights).__name__}")
    elif not raw_weights:
        problems.append("weights: must name at least one version")
    else:
        for version_text, weight in raw_weights.items():
            try:
                version = validate_version(str(version_text))
            except InvalidNameError:
                problems.append(f"weights: version {version_text!r} is not a positive integer")
                continue
            if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
                problems.append(f"weights: weight of version {version_text!r} must be an integer "
                                f"0..{MAX_WEIGHT}, got {weight!r}")
                continue
            if version in weights:
                problems.append(f"weights: version {version_text!r} appears twice")
                continue
            weights[version] = weight
        if weights and len(weights) == len(raw_weights) and sum(weights.values()) <= 0:
            problems.append("weights must sum to > 0")

    sticky_header = data.get("sticky_header")
    if sticky_header is not None:
        if not isinstance(sticky_header, str) or not _HEADER_RE.fullmatch(sticky_header.lower()):
            problems.append(f"sticky_header: {sticky_header!r} is not an HTTP header name")
        else:
            sticky_header = sticky_header.lower()

    default_version = data.get("default_version")
    if default_version is not None and (isinstance(default_version, bool)
                                        or not isinstance(default_version, int) or default_version < 1):
        problems.append(f"default_version: {default_version!r} is not a positive integer")

    access = None
    if data.get("access") is not None:
        access = parse_access_rule(data["access"], problems)

    if problems:
        raise InvalidDocumentError("routing document", problems)
    return RoutingDocument.model_construct(weights=weights, sticky_header=sticky_header,
                                           default_version=default_version, access=access)


class StatusDocument(BaseModel):
    """What the gateway applied for one model, at ``models/<model>/status`` (written by the gateway)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    effective_weights: dict[int, int] = Field(default_factory=dict)
    """Version → weight actually in Envoy's route (weighted versions without instances dropped)."""
    applied_revision: int = 0
    """The etcd revision of the registry state that was rendered."""
    envoy_config_version: str = ""
    published_at: datetime | None = None
    warnings: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    """E.g. an invalid routing document (the last good routing stays in force)."""
    routing: RoutingDocument | None = None
    """The routing document in force: the last good one while the current one is invalid. A
    gateway that restarts while the document in etcd is invalid starts from this one instead of
    sending every request to the newest version."""
    routing_revision: int = 0
    """mod_revision of the routing document in etcd that this status answers for (0: none). Once
    it is the revision a write returned, that write was rendered: ``effective_weights`` is what came
    of it, and ``warnings``/``errors`` say why they differ from the document (``sluice weights set
    --wait`` reads this)."""
    routing_source: str = "none"
    """Where ``routing`` comes from: ``document`` (the one at ``routing_revision``), ``last-good``
    (the document at ``routing_revision`` is invalid; an earlier one stays in force) or ``none``
    (no routing document: the gateway sends all traffic to the newest serving version, mesh-sync
    leaves the VirtualService's weights)."""
    failed_routing_revision: int | None = None
    """Set while the newest snapshot failed to publish (its reason is in ``errors``, the routing
    above stays in force): the mod_revision of the routing document that snapshot carried for this
    model, 0 when it carried none (a deletion). None: the last publish did not fail. ``--wait``
    ends at once when this is the revision it waits for."""

    auth: dict[str, str] | None = None
    """The authentication the gateway enforces: ``tls`` (client to gateway) and ``upstream_tls``
    (gateway to services), each ``off``, ``tls`` or ``mtls``; ``jwt`` ``off`` or ``on``. None: not
    reported (a status written by mesh-sync, or by a gateway before this field)."""

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> StatusDocument:
        return _parse(cls, raw, "status document")
