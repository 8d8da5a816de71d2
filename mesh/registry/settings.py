"""Settings of the etcd registry. The only module of :mod:`mesh` that reads the environment.

Precedence is argument > environment (``SLUICE_ETCD_…``) > default: pass flags as keyword
arguments, ``EtcdSettings(**overrides)``, and the environment fills in the rest. The fields are
also the etcd connection flags of every command (their docstrings are the flags' help).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mesh.observability.component import cli
from mesh.registry.keys import normalize_prefix


def parse_endpoint(endpoint: str) -> tuple[str, int, bool | None]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` → (host, port, tls or None if unsaid)."""
    tls: bool | None = None
    rest = endpoint.strip()
    for scheme, secure in (("https://", True), ("http://", False)):
        if rest.startswith(scheme):
            rest, tls = rest[len(scheme):], secure
            break
    rest = rest.rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port (e.g. 127.0.0.1:2379)")
    return host.strip("[]"), int(port_text), tls


class EtcdSettings(BaseSettings):
    """Where etcd is and how to talk to it (env prefix ``SLUICE_ETCD_``)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_ETCD_", extra="forbid", frozen=True,
                                      use_attribute_docstrings=True)

    endpoints: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:2379"],
                                                      json_schema_extra=cli(flag="--etcd", metavar="ENDPOINTS"))
    """Comma-separated host:port list, tried in order."""
    prefix: str = "/sluice/"
    """Every key lives under this prefix; it starts and ends with ``/``."""
    ca_cert: Path | None = None
    """CA bundle that signed etcd's server certificate (turns TLS on)."""
    cert: Path | None = None
    """Client certificate for etcd's ``--client-cert-auth`` (with ``key``; turns TLS on)."""
    key: Path | None = None
    """Private key of ``cert``."""
    username: str | None = None
    """etcd user (with ``password``) when etcd auth is enabled."""
    password: SecretStr | None = None
    """Its password (prefer SLUICE_ETCD_PASSWORD: a flag shows in the process list)."""
    lease_ttl: int = Field(10, ge=2, le=3600)
    """Seconds a service's registrations outlive its last keepalive."""
    connect_timeout: float = Field(5.0, gt=0)
    """Seconds to wait for an endpoint to answer when connecting."""
    request_timeout: float = Field(5.0, gt=0)
    """Seconds for a single request (get, put, transaction, lease call)."""

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one etcd endpoint is needed")
        for endpoint in value:
            parse_endpoint(endpoint)
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return normalize_prefix(value)

    @model_validator(mode="after")
    def _check_pairs(self) -> EtcdSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: give both or neither")
        return self

    @property
    def use_tls(self) -> bool:
        """TLS when a CA or client certificate is given or an endpoint says ``https://``."""
        if self.ca_cert is not None or self.cert is not None:
            return True
        return any(parse_endpoint(endpoint)[2] for endpoint in self.endpoints)
