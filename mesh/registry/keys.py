"""The etcd key schema (a user-facing API: see ``docs/etcd-schema.md``).

::

    <prefix>models/<model>/instances/<version>/<instance-id>   InstanceRecord, under a lease
    <prefix>models/<model>/routing                             RoutingDocument, by operators
    <prefix>models/<model>/status                              StatusDocument, by the gateway
    <prefix>models/<model>/rollout                             rollout document (mesh.rollout)
    <prefix>rollout-controller/leader                          the leading rollout controller, under its lease

Keys are ``str`` here; :mod:`mesh.registry.etcd` encodes them to the bytes etcd stores.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from mesh import protocol
from mesh.errors import InvalidKeyError, InvalidNameError

DEFAULT_PREFIX = "/sluice/"

_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")


class KeyKind(str, enum.Enum):
    """What a key under ``models/<model>/`` holds."""

    INSTANCE = "instance"
    ROUTING = "routing"
    STATUS = "status"
    ROLLOUT = "rollout"


@dataclass(frozen=True)
class ParsedKey:
    """A key split back into its parts; ``version``/``instance_id`` are set for instances only."""

    model: str
    kind: KeyKind
    version: int | None = None
    instance_id: str | None = None


def validate_model_name(model: str) -> str:
    """Return ``model`` if it follows :data:`mesh.protocol.MODEL_NAME_RULE`."""
    if not protocol.is_model_name(model):
        shown = protocol.clip(model) if isinstance(model, str) else repr(model)
        raise InvalidNameError(f"model name {shown!r} is invalid: use {protocol.MODEL_NAME_RULE}")
    return model


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is 1-128 characters of ``A-Z a-z 0-9 _ . : @ -``."""
    if not isinstance(instance_id, str) or not _INSTANCE_RE.fullmatch(instance_id):
        raise InvalidNameError(
            f"instance id {instance_id!r} is invalid: use 1-128 characters A-Z a-z 0-9 _ . : @ -, "
            "starting with a letter or digit"
        )
    return instance_id


def validate_version(version: int | str) -> int:
    """A model version: a positive integer (``"3"`` is accepted, ``"03"`` and ``True`` are not)."""
    if isinstance(version, bool):
        raise InvalidNameError(f"version {version!r} is not a positive integer")
    if isinstance(version, int):
        if version < 1:
            raise InvalidNameError(f"version {version!r} is not a positive integer")
        return version
    parsed = protocol.parse_version_text(version)
    if parsed is not None:
        return parsed
    shown = protocol.clip(version) if isinstance(version, str) else repr(version)
    raise InvalidNameError(f"version {shown!r} is not a positive integer")


def normalize_prefix(prefix: str) -> str:
    """``/sluice`` → ``/sluice/``; the prefix must start with ``/`` and hold no empty segment."""
    if not prefix.startswith("/"):
        raise ValueError(f"prefix {prefix!r} must start with '/'")
    if not prefix.endswith("/"):
        prefix += "/"
    if "//" in prefix:
        raise ValueError(f"prefix {prefix!r} must not contain an empty segment ('//')")
    return prefix


@dataclass(frozen=True)
class KeySchema:
    """Builds and parses the keys under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))

    @property
    def models_prefix(self) -> str:
        """Everything the registry holds: list or watch this."""
        return f"{self.prefix}models/"

    def model_prefix(self, model: str) -> str:
        return f"{self.models_prefix}{validate_model_name(model)}/"

    def instances_prefix(self, model: str, version: int | None = None) -> str:
        base = f"{self.model_prefix(model)}instances/"
        return base if version is None else f"{base}{validate_version(version)}/"

    def instance(self, model: str, version: int, instance_id: str) -> str:
        return f"{self.instances_prefix(model, version)}{validate_instance_id(instance_id)}"

    def routing(self, model: str) -> str:
        return f"{self.model_prefix(model)}routing"

    def status(self, model: str) -> str:
        return f"{self.model_prefix(model)}status"

    def rollout(self, model: str) -> str:
        return f"{self.model_prefix(model)}rollout"

    @property
    def rollout_leader(self) -> str:
        """Held by the rollout controller that drives every rollout (an election under a lease)."""
        return f"{self.prefix}rollout-controller/leader"

    def parse(self, key: str | bytes) -> ParsedKey:
        """Split a key into (model, kind, version, instance id); InvalidKeyError if it does not fit."""
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        if not text.startswith(self.models_prefix):
            raise InvalidKeyError(f"key {text!r} is not under {self.models_prefix!r}")
        parts = text[len(self.models_prefix):].split("/")
        try:
            model = validate_model_name(parts[0])
            if len(parts) == 2 and parts[1] == KeyKind.ROUTING.value:
                return ParsedKey(model, KeyKind.ROUTING)
            if len(parts) == 2 and parts[1] == KeyKind.STATUS.value:
                return ParsedKey(model, KeyKind.STATUS)
            if len(parts) == 2 and parts[1] == KeyKind.ROLLOUT.value:
                return ParsedKey(model, KeyKind.ROLLOUT)
            if len(parts) == 4 and parts[1] == "instances":
                return ParsedKey(model, KeyKind.INSTANCE, validate_version(parts[2]),
                                 validate_instance_id(parts[3]))
        except InvalidNameError as exc:
            raise InvalidKeyError(f"key {text!r}: {exc}") from exc
        raise InvalidKeyError(
            f"key {text!r} does not match models/<model>/routing, models/<model>/status, models/<model>/rollout or "
            "models/<model>/instances/<version>/<instance-id>"
        )
