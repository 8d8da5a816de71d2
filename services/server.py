"""The model service process: start-up → serve → graceful shutdown.

Two halves: a synchronous gRPC server whose handler threads convert requests and run inference
(measured here: a bare sync gRPC server outruns grpc.aio, and the inference needs a thread of its
own anyway), and an asyncio loop on the main thread for everything else: loading and retiring
models, watching the repository, etcd registration, signals.

Start-up opens the port (liveness) before loading the repository (readiness); shutdown (SIGTERM or
SIGINT) flips health to NOT_SERVING, leaves etcd, stops accepting, lets in-flight requests finish
within the grace period, then drains and unloads every model.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import filters, server_interceptor
from opentelemetry.sdk.trace import TracerProvider

from mesh import protocol
from mesh.observability.tracing import configure_tracing, shutdown_tracing
from mesh.ports import bind_problem, check_bindable
from mesh.registry.settings import EtcdSettings
from mesh.tls_files import TlsFileError
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference._pool import POOL
from services.catalog import ModelCatalog
from services.dataplane import DataPlane
from services.debug import admin_tls, version_memory
from services.grpc.handlers import HandlerPool
from services.grpc.interceptor import ErrorInterceptor
from services.grpc.servicer import RAW_REQUEST_METHODS, InferenceServicer
from services.heap import HeapTrimmer
from services.manager import ModelManager
from services.metrics import ServiceMetrics
from services.registration import Registration
from services.rest.server import REST_PORT_FLAG, RestServer
from services.served import ServedVersion
from services.settings import ServiceSettings
from services.shadow import follow_rollouts
from services.shadow_process import make_shadow
from services.streams import StreamGuard
from services.tls import CertificateReloader, load_server_tls, uvicorn_options
from services.watcher import RepositoryWatcher

log = structlog.get_logger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
INFER_METHOD = f"/{INFERENCE_SERVICE}/ModelInfer"
METRICS_PORT_FLAG = "--metrics-port (default --port + 1; -1 turns metrics off)"


def _reflection_pool() -> None:
    """Reflection reads one pool: make the health service visible in ours too."""
    try:
        POOL.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


class ModelServer:
    def __init__(self, settings: ServiceSettings, etcd: EtcdSettings | None = None) -> None:
        self.settings = settings
        self.etcd = etcd if settings.register_in_etcd else None
        self.registration: Registration | None = None
        self.catalog = ModelCatalog()
        self.metrics = ServiceMetrics(arrivals=self.catalog.arrivals)
        self.manager = ModelManager(settings.repo, self.catalog, self.metrics,
                                    load_threads=settings.load_threads, drain_timeout=settings.drain_timeout,
                                    retire_delay=settings.deregister_grace if settings.register_in_etcd else 0.0,
                                    repository_control=settings.repository_control)
        self.manager.on_ready.append(self._on_ready)
        self.manager.on_retire.append(self._on_retire)
        self.watcher = (RepositoryWatcher(settings.repo, self.manager, settings.reload_quiet_ms,
                                          settings.watch_polling) if settings.watch else None)
        self.plane = DataPlane(self.catalog, self.manager)
        self.shadow = make_shadow(settings, self.catalog)
        self.metrics.prometheus_registry.register(self.shadow.collector())
        self.plane.shadow = self.shadow
        self._shadow_follow: asyncio.Task[None] | None = None
        self.health = HealthServicer()
        self.port = settings.port
        self.metrics_port: int | None = None
        self.rest: RestServer | None = None
        self.rest_port: int | None = None
        self._server: grpc.Server | None = None
        self._stop = asyncio.Event()
        self._tracer_provider: TracerProvider | None = None
        self.streams: StreamGuard | None = None
        self.tls_reloader: CertificateReloader | None = None
        self.heap = HeapTrimmer(settings.heap_trim_interval)

    async def start(self) -> None:
        s = self.settings
        started = time.perf_counter()
        self.check_ports()
        if s.metrics_port >= 0:
            try:  # a file problem is not a taken port: the TLS is built before the bind
                admin = admin_tls(s)  # HTTPS with the admin identity
            except (TlsFileError, ssl.SSLError, OSError) as exc:  # the files changed since the settings
                pair = "--admin-tls-cert/--admin-tls-key" if s.admin_tls_cert is not None else "--tls-cert/--tls-key"
                raise TlsFileError(f"the metrics port's TLS cannot be set up from {pair} and --admin-tls-client-ca: "
                                   f"{' '.join(str(exc).split())[:300]}") from exc
            try:
                self.metrics_port = self.metrics.serve(s.metrics_port, s.metrics_host, s.debug_endpoints,
                                                       memory_extras=lambda: version_memory(self.catalog),
                                                       tls=admin)
            except OSError as exc:  # taken between the check and now
                raise bind_problem("metrics", s.metrics_host, s.metrics_port, METRICS_PORT_FLAG,
                                   exc.strerror or str(exc)) from exc
        max_bytes = s.max_message_mb * 1024 * 1024
        self._tracer_provider = configure_tracing(s.service_name, s.otlp_endpoint, s.trace_sampling,
                                                  s.instance_id)
        if self._tracer_provider is not None:
            self.plane.tracer = self._tracer_provider.get_tracer("sluice.services")
        interceptors: list[grpc.ServerInterceptor] = []
        if self._tracer_provider is not None:
            # Server spans for every RPC but health checks (probes would drown the traces).
            interceptors.append(server_interceptor(  # type: ignore[no-untyped-call]
                tracer_provider=self._tracer_provider, filter_=filters.negate(filters.health_check())))
        errors = ErrorInterceptor(tracing=self._tracer_provider is not None,
                                  raw_requests=frozenset(f"/{INFERENCE_SERVICE}/{m}" for m in RAW_REQUEST_METHODS))
        server = grpc.server(
            cast(ThreadPoolExecutor, HandlerPool(self.catalog.arrivals, frozenset({INFER_METHOD}),
                                                 max_workers=s.max_concurrency, thread_name_prefix="grpc-handler",
                                                 batch_policy=s.handler_policy == "batch")),
            interceptors=interceptors or None,
            maximum_concurrent_rpcs=s.max_concurrency * 4,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
                # Unsent answers stay in memory until the client reads them: capping the calls of one
                # connection is the bound grpcio offers on what one connection can make it hold.
                ("grpc.max_concurrent_streams", s.max_calls_per_connection),
            ],
        )
        self.streams = StreamGuard(s.stream_limit, s.stream_idle_timeout)
        # Every element costs at least a byte of the message (see datatypes.check_shape).
        tls = load_server_tls(s.tls_cert, s.tls_key, s.tls_client_ca)
        servicer = InferenceServicer(self.plane, self.manager, asyncio.get_running_loop(),
                                     streams=self.streams, max_elements=max_bytes)
        registering: Any = errors.installing(server)  # every handler below goes through it
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registering)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registering)
        _reflection_pool()
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            registering, pool=POOL)
        try:
            if tls is None:
                self.port = server.add_insecure_port(f"{s.host}:{s.port}")
            else:
                self.tls_reloader = CertificateReloader(tls)  # renewed files serve without a restart
                self.port = server.add_secure_port(f"{s.host}:{s.port}", self.tls_reloader.credentials())
        except RuntimeError:  # grpcio's "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            raise bind_problem("gRPC", s.host, s.port, "--port", "the address is in use or not available here")
        self._server = server
        # Liveness first (the port answers while models load), readiness once loaded.
        self.health.set(protocol.SERVER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.start()
        if s.rest_port >= 0:  # the same data plane and batchers as gRPC, on this process's loop
            self.rest = RestServer(self.plane, self.manager, max_bytes=max_bytes, threads=s.max_concurrency,
                                   tls=uvicorn_options(tls))
            self.rest_port = await self.rest.start(s.rest_host or s.host, s.rest_port)
            if self.tls_reloader is not None and self.rest.ssl_context is not None:
                self.tls_reloader.watch_context(self.rest.ssl_context)
        if self.settings.register_in_etcd:
            # Registered versions must be reachable, so registration starts once the port is bound.
            self.registration = Registration(s, self.etcd or EtcdSettings(), self.port, admin_port=self.metrics_port,
                                             rest_port=self.rest_port)
            self.manager.on_ready.append(self.registration.on_ready)
            self.manager.on_failed.append(self.registration.on_failed)
            self.manager.on_reload_failed.append(self.registration.on_reload_failed)
            self.manager.load_checks.append(self.registration.check_record)
            self.manager.on_retire.insert(0, self.registration.on_retire)
            await self.registration.start()
            self._shadow_follow = asyncio.create_task(
                follow_rollouts(self.shadow, self.catalog, self.etcd or EtcdSettings(), self._stop))
        log.info("listening", address=f"{s.host}:{self.port}", metrics_port=self.metrics_port,
                 rest_port=self.rest_port, repo=str(s.repo))
        await self.manager.load_all()
        if self.watcher is not None:
            self.watcher.start()
        self.heap.start()
        self.shadow.start()
        await self.refresh_health()
        self.plane.started = True
        self.health.set(protocol.SERVER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", models=self.catalog.model_names(), seconds=round(time.perf_counter() - started, 3))

    def check_ports(self) -> None:
        """Raise :class:`PortBindError` (one line naming the flag) if a port to listen on is taken."""
        s = self.settings
        check_bindable(s.host, s.port, "gRPC", "--port")
        if s.metrics_port >= 0:
            check_bindable(s.metrics_host, s.metrics_port, "metrics", METRICS_PORT_FLAG)
        if s.rest_port >= 0:
            check_bindable(s.rest_host or s.host, s.rest_port, "REST", REST_PORT_FLAG)

    async def refresh_health(self) -> None:
        """One health service name per model: SERVING while it has a version ready."""
        for name in self.catalog.model_names():
            ready = bool(self.catalog.ready_versions(name)) and not self.plane.stopping
            self.health.set(protocol.health_service_name(name), health_pb2.HealthCheckResponse.SERVING if ready
                            else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _on_ready(self, served: ServedVersion) -> None:
        if self.plane.started:
            await self.refresh_health()

    async def _on_retire(self, name: str, version: int) -> None:
        if self.plane.started and self.catalog.ready_versions(name) == [version]:
            self.health.set(protocol.health_service_name(name), health_pb2.HealthCheckResponse.NOT_SERVING)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Start, serve until :meth:`request_stop` (``sluice serve`` calls it on SIGTERM/SIGINT), shut down."""
        self.check_ports()  # before anything starts: a taken port leaves nothing to shut down
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        log.info("shutting_down", grace_period=self.settings.grace_period)
        self.plane.stopping = True
        self.health.enter_graceful_shutdown()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.registration is not None:
            # Out of etcd first, then give the gateway time to stop routing here.
            await self.registration.close()
            await asyncio.sleep(self.settings.deregister_grace)
        if self._server is not None:
            # Stops accepting at once; running RPCs get the grace period to finish.
            stopped = self._server.stop(self.settings.grace_period)
            await asyncio.to_thread(stopped.wait)
        if self.rest is not None:
            await self.rest.stop()
        if self.streams is not None:
            self.streams.stop()
        if self.tls_reloader is not None:
            self.tls_reloader.stop()
        await self.heap.stop()
        self.shadow.stop()
        if self._shadow_follow is not None:
            self._shadow_follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shadow_follow
        await self.manager.close()
        self.metrics.close()
        shutdown_tracing(self._tracer_provider)
        log.info("stopped")
