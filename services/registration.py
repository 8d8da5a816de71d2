"""Registration of served versions in etcd: a thin bridge from the manager's hooks to the registrar."""

from __future__ import annotations

import socket

import structlog
from pydantic import ValidationError

from mesh.protocol import clip
from mesh.registry.records import ERROR_MAX, InstanceRecord, InstanceState
from mesh.registry.registrar import Registrar
from mesh.registry.settings import EtcdSettings
from services.errors import ModelLoadError
from services.model import OnnxModel
from services.served import ServedVersion
from services.settings import ServiceSettings

log = structlog.get_logger(__name__)


def advertise_address(settings: ServiceSettings, port: int) -> str:
    if settings.advertise_address:
        return settings.advertise_address
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def admin_address(settings: ServiceSettings, advertised: str, admin_port: int) -> str:
    """The admin (metrics) port at the metrics host, or at the advertised gRPC host when the
    metrics host is a wildcard (the pod or host address others reach)."""
    host = settings.metrics_host
    if host in ("0.0.0.0", "::", ""):
        return f"{advertised.rpartition(':')[0]}:{admin_port}"
    return f"[{host}]:{admin_port}" if ":" in host else f"{host}:{admin_port}"


class Registration:
    """Keeps etcd's view of this process equal to what it serves. Never blocks serving on etcd."""

    def __init__(self, settings: ServiceSettings, etcd: EtcdSettings, port: int, admin_port: int | None = None,
                 rest_port: int | None = None) -> None:
        self.address = advertise_address(settings, port)
        # REST is served by the same process: the gateway reaches it at the advertised gRPC host.
        self.rest_address = None if rest_port is None else f"{self.address.rpartition(':')[0]}:{rest_port}"
        self.admin_address = None if admin_port is None else admin_address(settings, self.address, admin_port)
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{port}"
        self.registrar = Registrar(etcd)
        self._serving: dict[tuple[str, int], InstanceRecord] = {}
        """The record of each version this process serves, as on_ready registered it."""
        self._closed = False

    async def start(self) -> None:
        await self.registrar.start()
        log.info("etcd_registering", address=self.address, instance_id=self.instance_id,
                 endpoints=self.registrar.settings.endpoints)

    def record(self, model: OnnxModel) -> InstanceRecord:
        return InstanceRecord(
            address=self.address, admin_address=self.admin_address, rest_address=self.rest_address,
            model=model.name, version=model.version,
            instance_id=self.instance_id, state=InstanceState.SERVING, sha256=model.sha256,
            labels=dict(model.config.labels),
        )

    def check_record(self, model: OnnxModel) -> None:
        """A load check: refuse a version whose instance record etcd would refuse (or that would
        burden every reader of the registry), so it fails to load instead of failing to register."""
        try:
            problem = self.record(model).size_problem()
        except ValidationError as exc:  # a record etcd readers would reject must not crash the load
            problem = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        if problem is not None:
            raise ModelLoadError(f"{model.where}: cannot be registered: {problem}")

    async def on_ready(self, served: ServedVersion) -> None:
        if self._closed:
            return
        record = self._serving[served.name, served.version] = self.record(served.model)
        await self.registrar.register(record, wait=0)

    async def on_reload_failed(self, name: str, version: int, reason: str | None) -> None:
        """The serving record carries why the newest files of its version failed to load (None:
        clear it). The state stays ``serving``: the older copy answers, so it is routed to."""
        record = self._serving.get((name, version))
        if self._closed or record is None:
            return
        error = None if reason is None else clip(f"reload failed, the previous copy serves on: {reason}",
                                                 ERROR_MAX - 40)
        await self.registrar.register(record.model_copy(update={"error": error}), wait=0)

    async def on_failed(self, name: str, version: int, reason: str) -> None:
        """Register the failure (state ``failed``, never routed to) so that ``sluice status`` shows it."""
        if self._closed:
            return
        record = InstanceRecord(address=self.address, admin_address=self.admin_address,
                                rest_address=self.rest_address, model=name,
                                version=version, instance_id=self.instance_id, state=InstanceState.FAILED,
                                error=clip(reason, ERROR_MAX - 40))
        await self.registrar.register(record, wait=0)

    async def on_retire(self, name: str, version: int) -> None:
        self._serving.pop((name, version), None)
        if not self._closed:
            await self.registrar.deregister(name, version, wait=1.0)

    async def close(self) -> None:
        """Revoke the lease: every registration of this process disappears at once."""
        self._closed = True
        await self.registrar.close(deregister=True)
