"""The gateway controller: registry watch → render → check → validate → publish → confirm → status.

The shared controller loop (:class:`mesh.control.ControlLoop`: watch, debounce, etcd reset grace,
status written back) calls :meth:`GatewayController.reconcile` with the registry state; it renders
a whole snapshot and, when it differs from the live one, takes it through the consistency check,
``envoy --mode validate``, atomic publication and confirmation over the admin API. Any failure
leaves the last good snapshot live and is written to the models' status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TypeVar

import structlog
import watchfiles

from gateway.admin import EnvoyAdmin, mismatches
from gateway.answers import AnswersServer, view_of
from gateway.auth import jwks_watch
from gateway.bootstrap import bootstrap
from gateway.envoy import EnvoyProcess, find_envoy, validate_snapshot
from gateway.errors import (
    ConfirmError,
    EnvoyValidationError,
    GatewayError,
    InconsistentSnapshotError,
    PublishError,
)
from gateway.metrics import GatewayMetrics, admin_tls
from gateway.publish import Publisher, load_published
from gateway.render import RenderOptions, render_options, render_snapshot
from gateway.rest_routes import SERVER_VERSION
from gateway.settings import GatewaySettings
from gateway.snapshot import Snapshot, dump_yaml, shape_key, snapshot_from_files, transition
from gateway.status import status_documents
from gateway.tls import TlsMaterial, auth_mode, tls_sources
from mesh.control import Changes, ControlLoop
from mesh.errors import MeshError
from mesh.observability.admin_tls import AdminTls
from mesh.ports import bind_problem, check_bindable
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import RoutingDocument, StatusDocument, parse_routing_document
from mesh.registry.settings import EtcdSettings
from mesh.registry.state import RegistryState, build_state
from mesh.tls_files import TlsFileError

T = TypeVar("T")
log = structlog.get_logger("gateway.controller")

_LIVENESS_INTERVAL = 1.0
_TLS_DEBOUNCE_MS = 200
"""Quiet time after a change to a watched certificate folder before the files are read again."""
_MAX_RETRY_DELAY = 30.0


def _write_atomically(path: Path, content: bytes) -> None:
    """Replace ``path`` by rename, so an Envoy starting right now never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


class GatewayController:
    """Keeps Envoy's routing equal to the registry; see the module docstring."""

    def __init__(self, settings: GatewaySettings, etcd_settings: EtcdSettings,
                 metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.etcd_settings = etcd_settings
        self.schema = KeySchema(etcd_settings.prefix)
        self.options = render_options(settings)
        self.metrics = metrics or GatewayMetrics()
        self.publisher = Publisher(settings.xds_dir)
        self.admin = EnvoyAdmin(settings.admin_url)
        self.envoy_binary = find_envoy(settings.envoy_binary)
        self.envoy: EnvoyProcess | None = None
        self.metrics_port: int | None = None
        self.tls = TlsMaterial(tls_sources(
            tls_cert=settings.tls_cert, tls_key=settings.tls_key, tls_client_ca=settings.tls_client_ca,
            upstream_tls_ca=settings.upstream_tls_ca, upstream_tls_cert=settings.upstream_tls_cert,
            upstream_tls_key=settings.upstream_tls_key))
        """The certificates in force as SDS secrets, published with every snapshot (gateway/tls.py)."""
        self.auth = auth_mode(tls_cert=settings.tls_cert, tls_client_ca=settings.tls_client_ca,
                              upstream_tls_ca=settings.upstream_tls_ca, upstream_tls_cert=settings.upstream_tls_cert,
                              jwt_issuer=getattr(settings, "jwt_issuer", None))
        """The authentication in force, reported in every status document."""
        self.answers = AnswersServer(lambda: view_of(self._live), SERVER_VERSION)
        """ServerLive/Ready/Metadata and RepositoryIndex without a model header (gateway/answers.py)."""
        self._pending_jwks: str | None = None
        """A new key set not yet accepted by Envoy: rendered until a publication takes it (then it
        goes into ``self.options``) or refuses it (then it is dropped, see :meth:`reconcile`)."""
        self._client = EtcdClient(etcd_settings)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-publish")
        self.control = ControlLoop(self._client, self.schema, controller="gateway",
                                   debounce=settings.debounce_ms / 1000, reset_grace=settings.registry_reset_grace,
                                   expected_errors=(GatewayError,),
                                   on_connection=lambda ok: self.metrics.etcd_connected.set(1 if ok else 0))
        """Watch, debounce, etcd reset grace and status documents: the loop shared with mesh-sync."""
        self._live: Snapshot | None = None
        self._live_published_at: datetime | None = None
        self._last_good: dict[str, RoutingDocument] = {}
        self._validated: set[str] = set()
        self._invalid: dict[str, str] = {}
        self._retry_at: float | None = None
        self._behind_since: float | None = None
        """When etcd first showed a write the watch had not delivered (None: caught up)."""
        self._watch_lag = 0.0
        self._failures = 0
        # Held while files are published: the liveness check must not "repair" a publish in flight.
        self._publishing = asyncio.Lock()

    @property
    def live(self) -> Snapshot | None:
        """The snapshot Envoy confirmed last."""
        return self._live

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then stop Envoy (if it is ours) and close everything.

        Raises :class:`~mesh.ports.PortBindError` first if a port it must listen on is taken.
        """
        self.check_ports()
        if self.settings.metrics_port >= 0:
            tls = self._admin_tls()  # a file problem is not a taken port: built before the bind
            try:
                self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port,
                                                       tls=tls)
            except OSError as exc:  # taken between the check and now
                raise bind_problem("the gateway's metrics", self.settings.metrics_host, self.settings.metrics_port,
                                   "--metrics-port (-1 turns metrics off)", exc.strerror or str(exc)) from exc
        self.options = replace(self.options, answers_address=await self.answers.start())
        await self._prepare_files()
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.settings.runs_envoy:
                path = self.bootstrap_path()
                await self._write_bootstrap(path)
                self.envoy = EnvoyProcess(self.envoy_binary, path, log_level=self.settings.envoy_log_level,
                                          concurrency=self.settings.envoy_concurrency,
                                          hot_restart=self.settings.envoy_hot_restart,
                                          on_restart=lambda _n: self.metrics.envoy_restarts.inc())
                await self.envoy.start()
            tasks = [asyncio.create_task(self.control.run(self._round), name="gateway-loop"),
                     asyncio.create_task(self._liveness_loop(), name="gateway-liveness")]
            if self.options.auth is not None:
                watch = jwks_watch(self.settings, self.options.auth)
                tasks.append(asyncio.create_task(watch.run(self._jwks_changed), name="gateway-jwks"))
            if self.tls.sources:
                tasks.append(asyncio.create_task(self._watch_tls(), name="gateway-tls-watch"))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done:
                error = None if task is stopper else task.exception()
                if error is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.envoy is not None:
                await self.envoy.stop()
            await self.answers.stop()
            await self._client.close()
            self.admin.close()
            self._io.shutdown(wait=True)
            log.info("gateway_stopped")

    def _jwks_changed(self, jwks: str) -> None:
        """A rotated key set: the next round renders it (a new listener; its connections drain).
        It is in force only once Envoy took it; until then the last good one stays in ``options``."""
        if self.options.auth is not None:
            self._pending_jwks = None if jwks == self.options.auth.jwks else jwks
            self.control.request()

    def _options_with(self, jwks: str | None) -> RenderOptions:
        if jwks is None or self.options.auth is None:
            return self.options
        return replace(self.options, auth=replace(self.options.auth, jwks=jwks))

    def _admin_tls(self) -> AdminTls | None:
        """The metrics port's TLS, or a one-line :class:`GatewayError` naming the flags of the files
        that cannot serve it (the settings checked them; they may have changed since)."""
        s = self.settings
        try:
            return admin_tls(s)
        except (TlsFileError, ssl.SSLError, OSError) as exc:
            pair = "--admin-tls-cert/--admin-tls-key" if s.admin_tls_cert is not None else "--tls-cert/--tls-key"
            reason = " ".join(str(exc).split())[:300]
            raise GatewayError(f"the metrics port's TLS cannot be set up from {pair} and --admin-tls-client-ca: "
                               f"{reason}") from exc

    def check_ports(self) -> None:
        """One :class:`~mesh.ports.PortBindError` naming the flag for a taken port, instead of a
        traceback from the metrics server or an Envoy that exits (admin) or never listens (listener)."""
        s = self.settings
        if s.metrics_port >= 0:
            check_bindable(s.metrics_host, s.metrics_port, "the gateway's metrics",
                           "--metrics-port (-1 turns metrics off)")
        if s.runs_envoy:
            check_bindable(s.listen_host, s.listen_port, "Envoy's gRPC listener", "--listen-port")
            check_bindable("127.0.0.1", s.admin_port, "Envoy's admin API", "--admin-port")

    async def write_bootstrap(self, path: Path) -> None:
        """For an Envoy run by someone else: its bootstrap at ``path``, and files it can start on.

        The watched directory gets the published snapshot if there is one, else an empty snapshot
        (Envoy exits when a file its bootstrap names is missing). Touches neither etcd nor Envoy.
        """
        try:
            await self._prepare_files()
            await self._write_bootstrap(path)
        finally:
            await self._client.close()
            self.admin.close()
            self._io.shutdown(wait=True)

    async def _write_bootstrap(self, path: Path) -> None:
        config = dump_yaml(bootstrap(self.options.xds_dir, self.settings.admin_port))
        await self._in_io(partial(_write_atomically, path, config))

    async def hot_restart_envoy(self) -> None:
        """Replace the supervised Envoy by a new one without dropping a request (see EnvoyProcess)."""
        if self.envoy is None:
            log.warning("envoy_hot_restart_ignored", reason="Envoy is not run by this gateway")
            return
        try:
            pid = await self.envoy.hot_restart()
        except GatewayError as exc:
            log.error("envoy_hot_restart_failed", error=str(exc))
            return
        self.metrics.envoy_hot_restarts.inc()
        log.info("envoy_hot_restarted", pid=pid, epoch=self.envoy.epoch)

    def bootstrap_path(self) -> Path:
        """The bootstrap lives next to the watched directory, not in it."""
        directory = self.settings.xds_dir.absolute()
        return directory.parent / f"{directory.name}.bootstrap.yaml"

    async def _in_io(self, func: Callable[[], T]) -> T:
        """Run blocking file work in the controller's one I/O thread (publications stay ordered)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, func)

    def _write(self, snapshot: Snapshot) -> None:
        """Dump and publish, with the TLS secrets in force (blocking: runs in the I/O thread)."""
        secrets = self.tls.files()
        self.publisher.publish({**snapshot.files(), **secrets}, private=secrets)

    async def _prepare_files(self) -> None:
        """Know what is published already; publish an empty snapshot if nothing is (Envoy needs files)."""
        documents = await self._in_io(partial(load_published, self.publisher.directory))
        existing = snapshot_from_files(documents)
        if existing is not None:
            self._live = existing
            log.info("gateway_found_snapshot", version=existing.version, clusters=len(existing.clusters))
            if self.tls.sources:
                # Certificates may have been renewed while the gateway was down: Envoy starts on these.
                await self._in_io(partial(self._write, existing))
            return
        empty = render_snapshot(build_state(self.schema, 0, []), {}, self.options)
        empty.consistent()
        await self._validate(empty)
        await self._in_io(partial(self._write, empty))
        self._live = empty
        log.info("gateway_initial_snapshot", version=empty.version)

    # -- certificates -----------------------------------------------------------------------------

    async def _watch_tls(self) -> None:
        """Publish renewed certificates: watch their folders, re-read and check the files, and hand
        Envoy the secrets that changed (SDS, see gateway/tls.py); unusable files are refused."""
        directories = sorted(str(d) for d in self.tls.directories())
        async for _changes in watchfiles.awatch(*directories, debounce=_TLS_DEBOUNCE_MS, step=50,
                                                 recursive=False):
            await self.reload_tls()

    async def reload_tls(self) -> list[str]:
        """Read the certificate files again and publish the secrets that changed; returns their names."""
        changed = await self._in_io(self.tls.reload)
        if not changed:
            return []
        async with self._publishing:
            live = self._live
            if live is None:
                return changed  # nothing published yet: the first snapshot carries them
            try:
                await self._in_io(partial(self._write, live))
                await self._wait_secrets(self.settings.confirm_timeout)
            except GatewayError as exc:
                log.error("tls_publish_failed", secrets=changed, error=str(exc))
                return changed
        self.metrics.publishes.labels("tls").inc()
        log.info("tls_published", secrets=changed, versions={n: v for n, v in self.tls.versions().items()
                                                              if n in changed})
        return changed

    async def _wait_secrets(self, timeout: float) -> None:
        """Until Envoy's config dump shows every secret it uses at the version in force (a secret
        nothing uses yet, such as the upstream certificate before the first model, is read when a
        cluster first needs it)."""
        wanted = self.tls.versions()
        deadline = time.monotonic() + timeout
        while True:
            dump = json.loads(await self.admin.get("/config_dump?resource=dynamic_active_secrets"))
            live = {entry.get("name"): entry.get("version_info") for entry in dump.get("configs", [])}
            if all(live[name] == version for name, version in wanted.items() if name in live):
                return
            if time.monotonic() > deadline:
                raise ConfirmError(f"Envoy did not apply the renewed certificates within {timeout:g}s "
                                   f"(wanted {wanted}, live {live})")
            await asyncio.sleep(0.02)

    # -- the loop ---------------------------------------------------------------------------------

    async def _round(self, state: RegistryState, changes: Changes) -> None:
        await self.reconcile(state, changes.since)

    async def _liveness_loop(self) -> None:
        """Re-publish when Envoy serves something else (restarted on other files), retry failures;
        measure the watch lag."""
        while True:
            await asyncio.sleep(_LIVENESS_INTERVAL)
            try:
                await self._check_envoy()
                self.metrics.envoy_up.set(1)
            except (GatewayError, ValueError):
                self.metrics.envoy_up.set(0)
            await self.measure_watch_lag()
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
                self.control.request()

    async def measure_watch_lag(self) -> float:
        """Seconds since etcd first showed a write under the prefix that the watch has not delivered
        (0 when caught up, or when etcd cannot be asked: the connection gauge covers that)."""
        state = self.control.state
        try:
            newest = await self._client.newest_mod_revision(self.schema.models_prefix)
        except MeshError:
            return self._watch_lag
        if state is not None and newest > state.revision:
            if self._behind_since is None:
                self._behind_since = time.monotonic()
            lag = time.monotonic() - self._behind_since
            if lag > 5 * _LIVENESS_INTERVAL:
                log.warning("registry_watch_lagging", seconds=round(lag, 1), etcd_revision=newest,
                            seen_revision=state.revision)
        else:
            self._behind_since = None
            lag = 0.0
        self._watch_lag = lag
        self.metrics.watch_lag.set(lag)
        return lag

    async def _check_envoy(self) -> None:
        if self._publishing.locked():
            return
        async with self._publishing:
            live = self._live
            if live is None:
                return
            live_config = await self.admin.live_config(with_endpoints=False)
            if mismatches(live, live_config, check_endpoints=False):
                log.warning("envoy_config_differs", expected=live.version, routes=live_config.routes_version)
                await self._in_io(partial(self._write, live))

    # -- one round ---------------------------------------------------------------------------------

    async def reconcile(self, state: RegistryState, started: float | None = None) -> Snapshot | None:
        """Render ``state`` and make it live; returns the live snapshot (the old one on failure)."""
        for name, model in state.models.items():
            if model.routing is not None:
                self._last_good[name] = model.routing
            elif (model.routing_error is not None and name not in self._last_good and model.status is not None
                  and model.status.routing is not None):
                # Restarted while the document is invalid: the routing in force before (kept in
                # the model's status) stays, rather than all traffic going to the newest version.
                try:
                    recovered = parse_routing_document(model.status.routing.to_dict())
                except MeshError as exc:
                    log.warning("last_good_routing_unusable", model=name, error=str(exc))
                    continue
                self._last_good[name] = recovered
                log.warning("last_good_routing_from_status", model=name, routing_error=model.routing_error,
                            weights=recovered.weights)
        pending = self._pending_jwks
        wanted = render_snapshot(state, self._last_good, self._options_with(pending))
        failure = await self._publish(wanted, started)
        if pending is not None and self._pending_jwks == pending:
            if failure is None:
                self.options, self._pending_jwks = self._options_with(pending), None
            else:
                # Was it the new key set? The same state with the key set in force tells: if that
                # goes live (or is live), the new set is refused and the last good one stays.
                fallback = render_snapshot(state, self._last_good, self.options)
                if await self._publish(fallback, started) is None:
                    self._pending_jwks = None
                    log.error("jwks_refused", error=failure, keeping="the last good key set")
                    failure = f"the new JWKS was refused ({failure}); the last good key set stays in force"
                    wanted = fallback
        await self._write_status(state, wanted, failure)
        return self._live

    async def _publish(self, wanted: Snapshot, started: float | None) -> str | None:
        """Make ``wanted`` live unless it is; returns why it failed (None: it is live)."""
        live = self._live
        if live is not None and wanted.content_hash == live.content_hash:
            # Nothing to publish, yet what Envoy serves is now ``wanted``: its plans (routing document
            # and revision) are the ones in force. Kept as they were, a later failed publish would
            # report the write before as the routing in force (revision 0 after a first document
            # that renders what no document did). The version stays: it is what Envoy serves.
            if live.revision != wanted.revision or live.plans != wanted.plans:
                self._live = replace(live, revision=wanted.revision, plans=wanted.plans)
            self.metrics.snapshot_revision.set(wanted.revision)  # the gauges follow the plans in force
            self.metrics.models.set(len(wanted.plans))
            self._failures, self._retry_at = 0, None  # what is wanted is live: nothing left to retry
            return None
        try:
            async with self._publishing:
                phases = await self._apply(wanted)
        except GatewayError as exc:
            log.error("gateway_publish_failed", version=wanted.version, error=str(exc))
            return f"{exc}; the last good config ({self._live.version if self._live else 'none'}) stays live"
        self._live, self._live_published_at = wanted, datetime.now(timezone.utc)
        self._failures, self._retry_at = 0, None
        self.metrics.publishes.labels("ok").inc()
        if started is not None:
            self.metrics.publish_seconds.observe(time.monotonic() - started)
        self.metrics.snapshot_revision.set(wanted.revision)
        self.metrics.snapshot.info({"version": wanted.version})
        self.metrics.models.set(len(wanted.plans))
        log.info("gateway_published", version=wanted.version, revision=wanted.revision,
                 models={n: dict(p.weights) for n, p in wanted.plans.items()},
                 seconds=round(time.monotonic() - started, 4) if started is not None else None,
                 phases=phases)
        return None

    async def _apply(self, wanted: Snapshot) -> dict[str, float]:
        """Check, validate, publish and confirm ``wanted``; returns seconds per phase."""
        phases: dict[str, float] = {}
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = round(phases.get(name, 0.0) + now - mark, 4)
            mark = now

        try:
            wanted.consistent()
        except InconsistentSnapshotError:
            self.metrics.publishes.labels("inconsistent").inc()
            raise
        try:
            await self._validate(wanted)
        except EnvoyValidationError:
            self.metrics.publishes.labels("invalid").inc()
            raise
        phase("validate")
        steps = transition(self._live, wanted)
        for step in steps:
            step.consistent()
        previous = self._live if self._live is not None and self._live.plans else None
        for step in steps:
            try:
                await self._in_io(partial(self._write, step))
                phase("publish")
                await self.admin.wait_live(step, self.settings.confirm_timeout, previous=previous)
                previous = step
                phase("confirm")
            except (PublishError, ConfirmError) as exc:
                self.metrics.publishes.labels("publish_failed" if isinstance(exc, PublishError)
                                              else "confirm_failed").inc()
                await self._roll_back()
                raise
        with contextlib.suppress(OSError):
            await self._in_io(self.publisher.cleanup)
        phases["steps"] = len(steps)
        return phases

    async def _roll_back(self) -> None:
        """Put the last good snapshot's files back and retry the new one later, with backoff."""
        self._failures += 1
        self._retry_at = time.monotonic() + min(_MAX_RETRY_DELAY, 0.5 * 2 ** self._failures)
        live = self._live
        if live is None:
            return
        try:
            await self._in_io(partial(self._write, live))
        except PublishError as exc:
            log.error("gateway_rollback_failed", error=str(exc))

    async def _validate(self, snapshot: Snapshot) -> None:
        """Validate with the real Envoy once per shape (weights aside, see :func:`shape_key`)."""
        key = shape_key(snapshot)
        if key in self._validated:
            self.metrics.validations.labels("cached").inc()
            return
        if key in self._invalid:
            raise EnvoyValidationError(self._invalid[key])
        started = time.monotonic()
        try:
            await validate_snapshot(self.envoy_binary, snapshot, self.settings.validate_timeout,
                                    secrets=list(self.tls.secrets.values()))
        except EnvoyValidationError as exc:
            self.metrics.validations.labels("failed").inc()
            log.error("envoy_validation_failed", version=snapshot.version, output=exc.output[-2000:])
            if len(self._invalid) > 256:
                self._invalid.clear()
            self._invalid[key] = str(exc)
            raise
        finally:
            self.metrics.validate_seconds.observe(time.monotonic() - started)
        self.metrics.validations.labels("ok").inc()
        if len(self._validated) > 1024:
            self._validated.clear()
        self._validated.add(key)

    async def _write_status(self, state: RegistryState, wanted: Snapshot, failure: str | None) -> None:
        watched = self.control.state  # what etcd holds: a model held after a reset has no status there
        documents = status_documents(wanted, self._live, self._live_published_at, failure, auth=self.auth)
        await self.control.status.write(documents, watched)
        # A model that left the registry (only its status is left) loses its status too.
        await self.control.status.remove(name for name, model in state.models.items()
                                      if name not in wanted.plans and model.status is not None)

    def statuses(self) -> Mapping[str, StatusDocument]:
        """The status documents this controller wrote last, per model."""
        return self.control.status.written
