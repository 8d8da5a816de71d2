"""Settings of one model-service process: CLI flags > environment (``SLUICE_…``) > config file > defaults."""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("sluice_config_file", default=None)


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="forbid")

    repo: Path = Path("models")
    """The model repository: <repo>/<model>/<version>/model.onnx."""
    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 inside containers."""
    port: int = Field(8001, ge=0, le=65535)
    """gRPC port (8001 as Triton's; 0 picks a free one)."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(8002, ge=-1, le=65535)
    """Prometheus /metrics port (0 picks a free one; -1 disables it). Unset: port + 1 (0 when port
    is 0 or 65535), so services that differ only in ``port`` do not collide on it."""
    max_message_mb: int = Field(64, ge=1, le=2047)
    """Largest gRPC message accepted or sent, in MiB."""
    max_concurrency: int = Field(128, ge=1, le=4096)
    """gRPC handler threads: requests handled at once (more wait in gRPC's queue, up to 4x this)."""
    max_streams: int | None = Field(None, ge=0, le=4095)
    """ModelStreamInfer streams open at once (each holds a handler thread while open); default half
    of max_concurrency. Always below max_concurrency, so that unary calls keep a thread."""
    stream_idle_timeout: float = Field(60.0, gt=0)
    """Seconds a stream may go without a request received or an answer taken before the server
    ends it (DEADLINE_EXCEEDED), freeing its handler thread."""
    max_calls_per_connection: int = Field(100, ge=1, le=65535)
    """Calls one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS; clients
    and Envoy queue or open another connection beyond it). A call whose answer the client does not
    read stays open, so this bounds the unsent answers one connection can make the server hold."""
    handler_policy: Literal["batch", "normal"] = "batch"
    """Linux scheduling policy of the handler threads: ``batch`` (SCHED_BATCH: a waking thread
    does not preempt the running one, so inference and request handling are not cut up on a busy
    core) or ``normal`` (the default policy, for latency-sensitive neighbours on a shared core)."""
    grace_period: float = Field(10.0, ge=0)
    """On SIGTERM: seconds to finish in-flight requests after the server stops accepting new ones."""
    drain_timeout: float = Field(30.0, ge=0)
    """Seconds a retired model version gets to finish its queued requests."""
    watch: bool = True
    """Watch the repository and load, replace and retire versions as files change."""
    watch_polling: bool = False
    """Poll instead of inotify (network file systems, some container volumes)."""
    reload_quiet_ms: int = Field(300, ge=10, le=60_000)
    """A version is loaded once its files have been unchanged for this long."""
    load_threads: int = Field(1, ge=1, le=16)
    """Threads that load models (kept small so loading never starves serving)."""
    repository_control: bool = False
    """Allow RepositoryModelLoad / RepositoryModelUnload (an admin surface: any client could take
    a model offline). Off, as in Triton's default model-control mode: they answer PERMISSION_DENIED."""
    registry: bool = False
    """Register served versions in etcd (connection: the SLUICE_ETCD_… settings / --etcd flags)."""
    advertise_address: str | None = None
    """host:port the gateway should use for this process (default: host:port, or this host's
    address when listening on 0.0.0.0)."""
    instance_id: str | None = None
    """Unique name of this process in etcd (default: <hostname>-<port>)."""
    deregister_grace: float = Field(2.0, ge=0)
    """Seconds between deregistering a version (or the process) and draining it, so the gateway
    stops routing to it first."""
    otlp_endpoint: str | None = None
    """OTLP gRPC collector for traces (e.g. http://127.0.0.1:4317); tracing is off without it."""
    trace_sampling: float = Field(1.0, ge=0.0, le=1.0)
    """Share of new traces sampled (requests arriving with a sampled traceparent are always traced)."""
    service_name: str = "sluice-service"
    """service.name on spans."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_levels: str | None = None
    """Per-component levels, e.g. "services.batcher=debug,mesh=warning"."""
    log_format: Literal["auto", "json", "console"] = "auto"

    @property
    def stream_limit(self) -> int:
        """The bound on open streams: max_streams, or half of max_concurrency."""
        return self.max_concurrency // 2 if self.max_streams is None else self.max_streams

    @model_validator(mode="before")
    @classmethod
    def _metrics_port_follows_port(cls, data: Any) -> Any:
        # Before validation: only then is "not given" (absent or None) distinguishable from 8002.
        if isinstance(data, dict) and data.get("metrics_port") is None:
            try:
                port = int(data.get("port", 8001))
            except (TypeError, ValueError):
                return data  # the port field reports its own error
            data = {**data, "metrics_port": port + 1 if 0 < port < 65535 else 0}
        return data

    @model_validator(mode="after")
    def _streams_below_concurrency(self) -> ServiceSettings:
        if self.max_streams is not None and self.max_streams >= self.max_concurrency:
            raise ValueError(f"max_streams ({self.max_streams}) must be below max_concurrency "
                             f"({self.max_concurrency}): streams would hold every handler thread")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def load_settings(flags: dict[str, Any], config_file: Path | None = None) -> ServiceSettings:
    """Build the settings from CLI flags (None = not given), the environment and a YAML file."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    token = _CONFIG_FILE.set(config_file)
    try:
        return ServiceSettings(**{k: v for k, v in flags.items() if v is not None})
    finally:
        _CONFIG_FILE.reset(token)
