"""Settings of ``sluice mesh-sync``: each field is also its flag (the docstring is the help).

Precedence is flag > environment (``SLUICE_MESH_SYNC_…``) > default.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mesh.errors import InvalidNameError
from mesh.observability.component import cli, split_pairs
from mesh.registry.keys import validate_model_name

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class MeshSyncSettings(BaseSettings):
    """Settings of ``sluice mesh-sync`` (env prefix ``SLUICE_MESH_SYNC_``)."""

    model_config = SettingsConfigDict(env_prefix="SLUICE_MESH_SYNC_", extra="forbid", frozen=True,
                                      use_attribute_docstrings=True)

    virtual_services: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, json_schema_extra=cli(flag="--virtual-service", metavar="MODEL=NAME", repeat=True))
    """The VirtualService of a model (repeat; env: comma-separated iris=sluice-iris,mlp=sluice-mlp);
    other models are ignored."""
    namespace: str | None = None
    """Namespace of the VirtualServices; default: the pod's own (service account), else ``default``."""
    kubeconfig: Path | None = None
    """kubeconfig file; unset = in-cluster service account."""
    api_version: str = "v1"
    """Version of ``networking.istio.io`` to use (``v1`` needs Istio ≥ 1.22; ``v1beta1`` before)."""
    resync_interval: float = Field(30.0, gt=0)
    """Seconds between full passes over every VirtualService (catches edits made in Kubernetes)."""
    debounce_ms: int = Field(100, ge=0, le=10_000)
    """Wait this long after an etcd change for more."""
    max_conflict_retries: int = Field(3, ge=0, le=20)
    """How often a patch refused by a concurrent edit is re-planned from a fresh read."""
    metrics_host: str = "0.0.0.0"
    """Prometheus listen address."""
    metrics_port: int = Field(9103, ge=-1, le=65535)
    """Prometheus port (``/metrics``; also the liveness endpoint), -1 = off."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """JSON lines, console, or auto (console on a TTY)."""

    @field_validator("virtual_services", mode="before")
    @classmethod
    def _split_pairs(cls, value: Any) -> Any:
        return split_pairs(value, lambda item: f"{item!r} is not MODEL=VIRTUALSERVICE", need_value=True)

    @field_validator("virtual_services")
    @classmethod
    def _check_models(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one MODEL=VIRTUALSERVICE pair")
        for model in value:
            try:
                validate_model_name(model)
            except InvalidNameError as exc:
                raise ValueError(str(exc)) from exc
        return value

    def resolved_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        with contextlib.suppress(OSError):
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        return "default"
