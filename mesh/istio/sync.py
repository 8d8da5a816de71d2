"""``sluice mesh-sync``: etcd routing documents → Istio VirtualService weights, status back to etcd.

The loop is the one the gateway runs (:class:`mesh.control.ControlLoop`: the registry watched
into a :class:`~mesh.registry.state.RegistryState`, resync included); for every model whose keys
changed, and for all of them every ``resync_interval``, read its VirtualService, decide with
:func:`mesh.istio.plan.plan_sync` and apply the guarded JSON patch. A patch refused because the
object changed in between is retried from a fresh read (which then sees the concurrent edit and,
if it touched the weights, holds).
The outcome is written to ``models/<model>/status`` by the loop's status writer, as the
gateway's is (rewritten only when :func:`mesh.control.status_changed` says so).

The Kubernetes client is synchronous: every call runs in the one-thread ``k8s`` executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, cast

import prometheus_client
import structlog
from kubernetes import client, config
from prometheus_client import CollectorRegistry, Counter

from mesh.control import Changes, ControlLoop
from mesh.errors import MeshError
from mesh.istio.plan import Action, IstioError, apply_json_patch, plan_sync
from mesh.istio.settings import MeshSyncSettings
from mesh.ports import bind_problem, check_bindable
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import StatusDocument
from mesh.registry.settings import EtcdSettings
from mesh.registry.state import ModelState, RegistryState

log = structlog.get_logger("mesh.istio.sync")

class PatchConflictError(MeshError):
    """The API server refused a guarded patch: the object changed since it was read."""


class VirtualServiceNotFoundError(MeshError):
    """The VirtualService named for a model does not exist."""


class VirtualServices(Protocol):
    """Reads and patches VirtualServices in one namespace (blocking; called from the executor)."""

    def get(self, name: str) -> dict[str, Any]: ...

    def patch(self, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]: ...


class KubernetesVirtualServices:
    """:class:`VirtualServices` through the official ``kubernetes`` client's CustomObjectsApi."""

    GROUP = "networking.istio.io"
    PLURAL = "virtualservices"

    def __init__(self, namespace: str, api_version: str = "v1", kubeconfig: Path | None = None,
                 api_client: Any = None) -> None:
        if api_client is None:
            if kubeconfig is not None:
                api_client = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
            else:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
                api_client = client.ApiClient()
        self._api = client.CustomObjectsApi(api_client)
        self._exception = client.exceptions.ApiException
        self.namespace = namespace
        self.api_version = api_version

    def get(self, name: str) -> dict[str, Any]:
        try:
            result = self._api.get_namespaced_custom_object(self.GROUP, self.api_version, self.namespace,
                                                            self.PLURAL, name)
        except self._exception as exc:
            raise self._translate(exc, name) from exc
        return cast(dict[str, Any], result)

    def patch(self, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            # A list body is only sent as a JSON patch when the content type says so (else 422).
            result = self._api.patch_namespaced_custom_object(
                self.GROUP, self.api_version, self.namespace, self.PLURAL, name, operations,
                _content_type="application/json-patch+json")
        except self._exception as exc:
            # A failed `test` op is a bare 422 "Invalid" without details (kube-apiserver 1.20):
            # tell it from a malformed patch by evaluating the tests against a fresh read.
            if exc.status == 422 and self._tests_fail(name, operations):
                raise PatchConflictError(f"VirtualService {self.namespace}/{name} changed concurrently: a "
                                         "guarding test of the patch failed") from exc
            raise self._translate(exc, name) from exc
        return cast(dict[str, Any], result)

    def _tests_fail(self, name: str, operations: list[dict[str, Any]]) -> bool:
        tests = [op for op in operations if op.get("op") == "test"]
        if not tests:
            return False
        try:
            apply_json_patch(self.get(name), tests)
        except IstioError:
            return True
        except MeshError:
            return False
        return False

    def _translate(self, exc: Any, name: str) -> MeshError:
        where = f"VirtualService {self.namespace}/{name}"
        body = str(getattr(exc, "body", "") or "")
        if exc.status == 404:
            return VirtualServiceNotFoundError(f"{where} not found")
        if exc.status == 409:
            return PatchConflictError(f"{where} changed concurrently: {_reason(body)}")
        return MeshError(f"{where}: Kubernetes API answered {exc.status} {exc.reason}: {_reason(body)}")


def _reason(body: str) -> str:
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(body).get("message", body))
    return body


@dataclass(frozen=True)
class _Outcome:
    name: str
    revision: int
    effective: Mapping[int, int]
    resource_version: str
    patched: bool
    warnings: list[str]
    errors: list[str]
    model: ModelState
    """The registry's view of the model that was synced (its routing document and revision)."""


class SyncMetrics:
    """Prometheus counters of one mesh-sync process (own Prometheus registry: tests run several)."""

    def __init__(self) -> None:
        self.prometheus_registry = CollectorRegistry()
        self.syncs = Counter("sluice_mesh_sync_total", "VirtualService syncs by outcome "
                             "(patch, hold, in-sync, conflict, error)", ["outcome"], registry=self.prometheus_registry)


class MeshSync:
    """The mesh-sync loop for one namespace's VirtualServices."""

    def __init__(self, settings: MeshSyncSettings, etcd: EtcdClient, virtual_services: VirtualServices,
                 metrics: SyncMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.etcd = etcd
        self.schema = KeySchema(etcd.settings.prefix)
        self.virtual_services = virtual_services
        self.control = ControlLoop(etcd, self.schema, controller="mesh-sync", debounce=settings.debounce_ms / 1000,
                                   resync_interval=settings.resync_interval)
        """Watch, debounce, periodic passes and status documents: the loop shared with the gateway."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k8s")
        self.synced = asyncio.Event()
        """Set after every pass (tests wait on it)."""

    @property
    def state(self) -> RegistryState | None:
        """The registry as watched (None until the first listing)."""
        return self.control.state

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        loop = asyncio.create_task(self.control.run(self._round))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([loop, stopper], return_when=asyncio.FIRST_COMPLETED)
            if loop in done:
                loop.result()  # the loop ended on its own: it raised, let it propagate
        finally:
            for task in (loop, stopper):
                task.cancel()
            await asyncio.gather(loop, stopper, return_exceptions=True)
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _round(self, _state: RegistryState, changes: Changes) -> None:
        # Only the models given a VirtualService; each pass reads the newest state (sync_model).
        for model in sorted(model for model in self.settings.virtual_services if changes.includes(model)):
            await self.sync_model(model)
        self.synced.set()

    async def _k8s(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def sync_model(self, model: str) -> StatusDocument:
        """One pass for one model: read, plan, patch (retrying lost races), report."""
        name = self.settings.virtual_services[model]
        state = self.state
        model_state = (state.model(model) if state else None) or ModelState(model)
        revision = state.revision if state else 0
        bound = log.bind(model=model, virtual_service=name)
        errors: list[str] = []
        warnings: list[str] = []
        effective: dict[int, int] = {}
        resource_version = ""
        patched = False
        for attempt in range(self.settings.max_conflict_retries + 1):
            try:
                current = await self._k8s(self.virtual_services.get, name)
            except MeshError as exc:
                errors = [f"cannot read the VirtualService: {exc}"]
                bound.warning("mesh_sync_read_failed", error=str(exc))
                break
            plan = plan_sync(model_state, current)
            warnings, errors, effective = plan.warnings, plan.errors, plan.effective_weights
            resource_version = str((current.get("metadata") or {}).get("resourceVersion", ""))
            if plan.action is Action.NONE:
                self._count("in-sync" if not plan.errors else "error")
                break
            try:
                updated = await self._k8s(self.virtual_services.patch, name, plan.patch)
            except PatchConflictError as exc:
                bound.info("mesh_sync_conflict", attempt=attempt, error=str(exc))
                errors = [f"gave up after {attempt + 1} concurrent edits of the VirtualService: {exc}"]
                self._count("conflict")
                continue
            except MeshError as exc:
                errors = [*errors, f"cannot patch the VirtualService: {exc}"]
                bound.warning("mesh_sync_patch_failed", error=str(exc))
                break
            resource_version = str((updated.get("metadata") or {}).get("resourceVersion", ""))
            patched = plan.action is Action.PATCH
            self._count(plan.action.value)
            bound.info("mesh_sync_patched" if patched else "mesh_sync_held", weights=plan.effective_weights,
                       routing_revision=model_state.routing_revision, resource_version=resource_version,
                       errors=plan.errors)
            break
        return await self._report(model, _Outcome(name, revision, effective, resource_version, patched, warnings,
                                                  errors, model_state))

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.syncs.labels(outcome).inc()

    async def _report(self, model: str, outcome: _Outcome) -> StatusDocument:
        previous = self.control.status.previous(model, self.state)
        published = datetime.now(timezone.utc) if outcome.patched or previous is None else previous.published_at
        status = StatusDocument(
            effective_weights=dict(outcome.effective),
            applied_revision=outcome.revision,
            envoy_config_version=f"VirtualService {self.virtual_services_namespace}/{outcome.name}"
                                 f"@{outcome.resource_version}",
            published_at=published,
            warnings=outcome.warnings,
            errors=outcome.errors,
            # An invalid document leaves the VirtualService's weights (the last good ones) in place.
            routing=outcome.model.routing,
            routing_revision=outcome.model.routing_revision,
            routing_source=("document" if outcome.model.routing is not None else
                            "last-good" if outcome.model.routing_error is not None else "none"),
        )
        await self.control.status.write({model: status}, self.state)
        return status

    @property
    def virtual_services_namespace(self) -> str:
        return str(getattr(self.virtual_services, "namespace", "") or self.settings.resolved_namespace())


async def run_mesh_sync(settings: MeshSyncSettings, etcd_settings: EtcdSettings,
                        stop: asyncio.Event | None = None) -> None:
    """Connect to etcd and Kubernetes and sync until ``stop`` is set (a taken metrics port:
    :class:`~mesh.ports.PortBindError` before anything else)."""
    flag = "--metrics-port (-1 turns metrics off)"
    if settings.metrics_port >= 0:
        check_bindable(settings.metrics_host, settings.metrics_port, "metrics", flag)
    namespace = settings.resolved_namespace()
    virtual_services = KubernetesVirtualServices(namespace, settings.api_version, settings.kubeconfig)
    metrics = SyncMetrics()
    if settings.metrics_port >= 0:
        try:
            prometheus_client.start_http_server(settings.metrics_port, settings.metrics_host,
                                                registry=metrics.prometheus_registry)
        except OSError as exc:  # taken between the check and now
            raise bind_problem("metrics", settings.metrics_host, settings.metrics_port, flag,
                               exc.strerror or str(exc)) from exc
    started = time.monotonic()
    async with EtcdClient(etcd_settings) as etcd:
        log.info("mesh_sync_started", namespace=namespace, virtual_services=settings.virtual_services,
                 etcd=etcd.endpoint, connect_s=round(time.monotonic() - started, 3))
        await MeshSync(settings, etcd, virtual_services, metrics).run(stop)
