"""Render a whole Envoy snapshot as a pure function of the registry state.

``render_snapshot(state, last_good, options)`` reads nothing and writes nothing: the same inputs
give the same snapshot, byte for byte, so it is tested without Envoy or etcd.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.answers import ANSWERED_PATHS, ANSWERS_CLUSTER
from gateway.auth import AuthOptions, auth_filters, auth_options, auth_reply_mappers, open_routes, protect_model_routes
from gateway.body_routing import body_routing_filters, service_methods
from gateway.rest_routes import (
    gateway_rest_routes,
    model_rest_routes,
    rest_cluster,
    rest_cluster_name,
    rest_local_reply_mappers,
)
from gateway.settings import GatewaySettings
from gateway.snapshot import (
    LISTENER_NAME,
    RDS_FILE,
    ROUTE_CONFIG_NAME,
    ModelPlan,
    Resource,
    Snapshot,
    cluster_name,
    eds_file,
)
from gateway.tls import LISTENER_CERT, LISTENER_CLIENT_CA, UPSTREAM_CA, UPSTREAM_CERT, secret_file
from mesh.protocol import MODEL_HEADER, VERSION_HEADER, VERSION_PATTERN, VERSION_RULE, health_service_name
from mesh.registry.records import InstanceState, RoutingDocument
from mesh.registry.state import ModelState, RegistryState, resolve_weights
from protos.descriptors import SERVICE

STREAM_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
# Load and unload change what a service serves for every client: an admin surface, not traffic.
REPOSITORY_CONTROL_PATHS = (
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)
REPOSITORY_CONTROL_SETTING = "--allow-repository-control (env SLUICE_GATEWAY_ALLOW_REPOSITORY_CONTROL=true)"

# gRPC status codes of the gateway's own replies.
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_LOCAL_RATE_LIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"


@dataclass(frozen=True)
class RenderOptions:
    """The settings that shape the rendered config: a pure subset of :class:`GatewaySettings`, made
    by :func:`render_options` (defaults are the settings' own, declared there once)."""

    xds_dir: str
    """Absolute path of the watched directory; file xDS paths point into it."""
    listen_host: str
    listen_port: int
    connect_timeout_ms: int
    route_timeout: float
    per_try_timeout: float
    num_retries: int
    max_request_bytes: int
    health_check_interval: float
    max_connections: int
    max_pending_requests: int
    max_requests: int
    rate_limits: Mapping[str, int]
    access_log: str | None
    """File path of the JSON access log; None = Envoy's stdout."""
    otlp_endpoint: str | None
    """``host:port`` of an OTLP gRPC collector: Envoy traces every request into it (W3C traceparent)."""
    trace_sampling: float
    """Percent of new requests traced (requests with a sampled traceparent are always traced)."""
    allow_repository_control: bool
    """Route RepositoryModelLoad/Unload to the services; off: the gateway refuses them itself."""
    tls_cert: str | None
    """The listener's certificate file: set, the listener speaks TLS (ALPN h2, http/1.1) with the
    SDS secret ``sluice_listener_cert`` (gateway/tls.py); None: plaintext."""
    tls_client_ca: str | None
    """The clients' CA file: set, the listener requires a client certificate (SDS secret
    ``sluice_listener_client_ca``)."""
    upstream_tls_ca: str | None
    """PEM CA file of the services' certificates: model clusters speak TLS (None: plaintext)."""
    upstream_tls_cert: str | None
    upstream_tls_key: str | None
    """Envoy's client certificate and key towards services that require one (mTLS)."""
    upstream_tls_san: str | None
    """Subject alternative name the services' certificates must carry (None: any the CA signed)."""
    auth: AuthOptions | None
    """JWT authentication and per-model authorization (gateway/auth.py); None: off."""
    service_name: str = "sluice-gateway"
    """The tracing service name of Envoy's spans (not a setting)."""
    answers_address: str | None = None
    """``host:port`` of the controller's own gRPC answers (gateway/answers.py) for the RPCs that name
    no model, sent there when they carry no model header; None: no such routes (known once the
    controller's answers server listens)."""


def _absolute(path: Path | None) -> str | None:
    return str(path.absolute()) if path is not None else None


def render_options(settings: GatewaySettings) -> RenderOptions:
    """The render options of ``settings`` (file paths made absolute)."""
    return RenderOptions(
        xds_dir=str(settings.xds_dir.absolute()),
        listen_host=settings.listen_host,
        listen_port=settings.listen_port,
        connect_timeout_ms=settings.connect_timeout_ms,
        route_timeout=settings.route_timeout,
        per_try_timeout=settings.per_try_timeout,
        num_retries=settings.num_retries,
        max_request_bytes=settings.max_request_bytes,
        health_check_interval=settings.health_check_interval,
        max_connections=settings.max_connections,
        max_pending_requests=settings.max_pending_requests,
        max_requests=settings.max_requests,
        rate_limits=dict(settings.rate_limits),
        access_log=_absolute(settings.access_log),
        otlp_endpoint=settings.otlp_endpoint,
        trace_sampling=settings.trace_sampling,
        allow_repository_control=settings.allow_repository_control,
        tls_cert=_absolute(settings.tls_cert),
        tls_client_ca=_absolute(settings.tls_client_ca),
        upstream_tls_ca=_absolute(settings.upstream_tls_ca),
        upstream_tls_cert=_absolute(settings.upstream_tls_cert),
        upstream_tls_key=_absolute(settings.upstream_tls_key),
        upstream_tls_san=settings.upstream_tls_san,
        auth=auth_options(settings),
    )


def default_render_options(xds_dir: str, **overrides: Any) -> RenderOptions:
    """The options of a gateway with every setting at its default (tests, benchmarks), then
    ``overrides``. Reads no environment and checks no file."""
    return replace(render_options(GatewaySettings.model_construct(xds_dir=Path(xds_dir))), **overrides)


def plan_model(model: ModelState, last_good: RoutingDocument | None) -> ModelPlan:
    """The weights of one model: its routing document, or the last good one while it is invalid."""
    routing: RoutingDocument | None = model.routing
    source = "document" if routing is not None else "none"
    extra_errors: list[str] = []
    if model.routing_error is not None:
        routing = last_good
        if last_good is not None:
            source = "last-good"
            extra_errors.append("the last good routing stays in force")
        else:
            extra_errors.append("no earlier routing is known: the newest serving version takes all traffic")
    plan = resolve_weights(model, routing)
    warnings = list(plan.warnings) + list(model.problems)
    return ModelPlan(
        model=model.name,
        weights=dict(sorted((v, w) for v, w in plan.weights.items() if w > 0)),
        sticky_header=routing.sticky_header if routing is not None else None,
        warnings=tuple(warnings),
        errors=tuple(list(plan.errors) + extra_errors),
        routing_source=source,
        routing=routing,
        routing_revision=model.routing_revision,
    )


def render_snapshot(state: RegistryState, last_good: Mapping[str, RoutingDocument],
                    options: RenderOptions) -> Snapshot:
    """The snapshot for ``state``; ``last_good`` holds the last valid routing document per model."""
    models = {name: m for name, m in sorted(state.models.items()) if m.instances or m.routing or m.routing_error}
    plans: dict[str, ModelPlan] = {}
    clusters: dict[str, Resource] = {}
    endpoints: dict[str, Resource] = {}
    for name, model in models.items():
        plan = plan_model(model, last_good.get(name))
        skipped: list[str] = []
        for version, records in model.instances.items():
            if not records:
                continue
            cluster = cluster_name(name, version)
            clusters[cluster] = _cluster(cluster, name, options)
            if any(record.rest_address for record in records.values()):
                rest = rest_cluster_name(name, version)
                clusters[rest] = {**rest_cluster(clusters[cluster], rest, name, version),
                                  **_upstream_tls(options, "http/1.1")}
                rest_addresses = []
                for instance_id, record in sorted(records.items()):
                    if record.state is not InstanceState.SERVING or not record.rest_address:
                        continue
                    address = _socket_address(record.rest_address)
                    if address is None:
                        skipped.append(f"instance {instance_id!r} of version {version}: REST address "
                                       f"{record.rest_address!r} is not IP:port, left out")
                        continue
                    rest_addresses.append((instance_id, address))
                endpoints[rest] = _load_assignment(rest, rest_addresses)
            addresses = []
            for instance_id, record in sorted(records.items()):
                if record.state is not InstanceState.SERVING:
                    continue
                address = _socket_address(record.address)
                if address is None:
                    skipped.append(f"instance {instance_id!r} of version {version}: address {record.address!r} "
                                   "is not IP:port, left out")
                    continue
                addresses.append((instance_id, address))
            endpoints[cluster] = _load_assignment(cluster, addresses)
        if skipped:
            plan = replace(plan, warnings=plan.warnings + tuple(skipped))
        plans[name] = plan
    serving = {name: [v for v in m.serving_versions() if _has_endpoints(endpoints, cluster_name(name, v))]
               for name, m in models.items()}
    answers = _socket_address(options.answers_address) if options.answers_address else None
    if answers is not None:
        clusters[ANSWERS_CLUSTER] = _answers_cluster(options)
        endpoints[ANSWERS_CLUSTER] = _load_assignment(ANSWERS_CLUSTER, [("gateway-controller", answers)])
    rest_serving = {name: [v for v in m.serving_versions() if _has_endpoints(endpoints, rest_cluster_name(name, v))]
                    for name, m in models.items()}
    return Snapshot.build(state.revision, listener=_listener(options), clusters=clusters, endpoints=endpoints,
                          routes=_routes(plans, serving, rest_serving, options), plans=plans)


def _has_endpoints(endpoints: Mapping[str, Resource], cluster: str) -> bool:
    assignment = endpoints.get(cluster)
    return bool(assignment and assignment["endpoints"] and assignment["endpoints"][0]["lb_endpoints"])


def _socket_address(address: str) -> dict[str, Any] | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _config_source(path: str, directory: str) -> Resource:
    return {"resource_api_version": "V3",
            "path_config_source": {"path": path, "watched_directory": {"path": directory}}}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _tracing(options: RenderOptions) -> Resource:
    """Envoy's OpenTelemetry tracer: the gateway span starts (or joins) the trace, and the W3C
    ``traceparent`` it sends upstream makes the service spans its children."""
    if not options.otlp_endpoint:
        return {}
    target = options.otlp_endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
    return {"tracing": {
        "random_sampling": {"value": options.trace_sampling},
        "spawn_upstream_span": False,
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            # google_grpc needs no cluster of its own, so the bootstrap and validation stay as they are.
            "grpc_service": {"google_grpc": {"target_uri": target, "stat_prefix": "sluice_otlp"},
                             "timeout": "2s"},
            "service_name": options.service_name,
        }},
    }}


def _listener(options: RenderOptions) -> Resource:
    directory = options.xds_dir
    fields = {
        "start_time": "%START_TIME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "trace_id": "%TRACE_ID%",
        "traceparent": "%REQ(TRACEPARENT)%",
        "b3_trace_id": "%REQ(X-B3-TRACEID)%",
        "model": "%REQ(X-MODEL-NAME)%",
        "pinned_version": "%REQ(X-MODEL-VERSION)%",
        "method": "%REQ(:PATH)%",
        "cluster": "%UPSTREAM_CLUSTER_RAW%",
        "upstream": "%UPSTREAM_HOST%",
        "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
        "http_status": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS(NUMBER)%",
        "flags": "%RESPONSE_FLAGS%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "duration_ms": "%DURATION%",
        "bytes_in": "%BYTES_RECEIVED%",
        "bytes_out": "%BYTES_SENT%",
    }
    log_format = {"json_format": fields}
    if options.access_log is None:
        access_log = {"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": log_format}}
    else:
        access_log = {"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": options.access_log, "log_format": log_format}}
    buffer = {
        # Unary requests are buffered whole (needed for retries anyway) and capped; the bidi stream
        # RPC would never end its request body, so it skips the buffer.
        "name": "sluice.max_request_bytes",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": options.max_request_bytes}},
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": {"single_predicate": {
                    "input": {"name": "path", "typed_config": {
                        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                        "header_name": ":path"}},
                    "value_match": {"exact": STREAM_PATH}}},
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            }]}},
        },
    }
    # Body routing after the buffer: the extraction alone refuses bodies over 16 MiB.
    http_filters: list[Resource] = [buffer, *body_routing_filters(), *auth_filters(options.auth)]
    if options.rate_limits:
        # Off at the filter level; each rate-limited model's routes carry their own token bucket.
        http_filters.append({"name": _RATE_LIMIT_FILTER, "typed_config": {
            "@type": _LOCAL_RATE_LIMIT, "stat_prefix": "sluice_rate_limit"}})
    # Per-cluster gRPC status counts (cluster.<model>.v<N>.grpc.…): what a canary analysis compares.
    # The methods of our service by name, every other path as "grpc.*": stats_for_all_methods would
    # make a stat name of each path a client sends (unbounded), built on every request.
    http_filters.append({"name": "envoy.filters.http.grpc_stats", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        "individual_method_stats_allowlist": {"services": [{"name": SERVICE, "method_names": list(
            service_methods())}]},
        "enable_upstream_stats": True}})
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
    too_large = f"request larger than {options.max_request_bytes} bytes (the gateway's max_request_bytes)"
    hcm = {
        "@type": _HCM,
        "stat_prefix": "sluice",
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Paths are matched as the service will read them: "//" and percent-encoded letters must
        # not slip a method past the repository control refusals.
        "normalize_path": True,
        "merge_slashes": True,
        "stream_idle_timeout": "300s",
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "rds": {"route_config_name": ROUTE_CONFIG_NAME,
                "config_source": _config_source(f"{directory}/{RDS_FILE}", directory)},
        "http_filters": http_filters,
        "access_log": [access_log],
        **_tracing(options),
        "local_reply_config": {"mappers": [
            *auth_reply_mappers(options.auth, allow_repository_control=options.allow_repository_control),
            *rest_local_reply_mappers(too_large), {
            # The buffer filter's "413 Payload Too Large" as a gRPC error a client understands.
            "filter": {"status_code_filter": {"comparison": {
                "op": "EQ", "value": {"default_value": 413, "runtime_key": "sluice.too_large"}}}},
            "body": {"inline_string": too_large},
        }]},
    }
    return {
        "name": LISTENER_NAME,
        "address": {"socket_address": {"address": options.listen_host, "port_value": options.listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}], **_listener_tls(options)}],
    }


def _sds(secret: str, directory: str) -> Resource:
    """An SDS secret read from its file in the watched directory (gateway/tls.py publishes it)."""
    return {"name": secret, "sds_config": _config_source(f"{directory}/{secret_file(secret)}", directory)}


def _listener_tls(options: RenderOptions) -> Resource:
    """The listener's TLS: one port for gRPC (h2) and REST (http/1.1), chosen by ALPN."""
    if not options.tls_cert:
        return {}
    common: Resource = {"alpn_protocols": ["h2", "http/1.1"],
                        "tls_certificate_sds_secret_configs": [_sds(LISTENER_CERT, options.xds_dir)]}
    context: Resource = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": common}
    if options.tls_client_ca:
        common["validation_context_sds_secret_config"] = _sds(LISTENER_CLIENT_CA, options.xds_dir)
        context["require_client_certificate"] = True
    return {"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": context}}


def _cluster(name: str, model: str, options: RenderOptions) -> Resource:
    directory = options.xds_dir
    interval = _seconds(options.health_check_interval)
    return {
        "name": name,
        # Stats as cluster.<model>_v<N>.…: Envoy's Prometheus tag extraction stops at the first dot,
        # so "iris.v2" would come out as cluster "iris" with "v2_" glued to every metric name.
        "alt_stat_name": name.replace(".", "_"),
        "type": "EDS",
        "eds_cluster_config": {"service_name": name,
                               "eds_config": _config_source(f"{directory}/{eds_file(name)}", directory)},
        "connect_timeout": _seconds(options.connect_timeout_ms / 1000),
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1024}}}},
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": options.max_connections,
            "max_pending_requests": options.max_pending_requests,
            "max_requests": options.max_requests,
            "max_retries": max(3, options.max_requests // 10),
        }]},
        "outlier_detection": {
            "consecutive_5xx": 3,
            "consecutive_gateway_failure": 2,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        "health_checks": [{
            "timeout": "1s",
            "interval": interval,
            "no_traffic_interval": interval,
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": health_service_name(model)},
        }],
        # A host taken out of the registry leaves at once, even while it still passes health checks.
        "ignore_health_on_host_removal": True,
        **_upstream_tls(options, "h2"),
    }


def upstream_tls_socket(options: RenderOptions, alpn: str) -> Resource | None:
    """The transport socket of a model cluster when the services speak TLS (None: plaintext)."""
    if options.upstream_tls_ca is None:
        return None
    # The CA and the client certificate come by SDS from their files (gateway/tls.py): renewed, they
    # reach new connections without a restart; the name check stays in the config.
    names: Resource = {}
    common: Resource = {"alpn_protocols": [alpn], "combined_validation_context": {
        "default_validation_context": names,
        "validation_context_sds_secret_config": _sds(UPSTREAM_CA, options.xds_dir)}}
    if options.upstream_tls_cert and options.upstream_tls_key:
        common["tls_certificate_sds_secret_configs"] = [_sds(UPSTREAM_CERT, options.xds_dir)]
    context: Resource = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                         "common_tls_context": common}
    san = options.upstream_tls_san
    if san:
        uri = "://" in san
        names["match_typed_subject_alt_names"] = [{"san_type": "URI" if uri else "DNS", "matcher": {"exact": san}}]
        if not uri:
            context["sni"] = san
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _upstream_tls(options: RenderOptions, alpn: str) -> Resource:
    socket = upstream_tls_socket(options, alpn)
    return {} if socket is None else {"transport_socket": socket}


def _answers_cluster(options: RenderOptions) -> Resource:
    """The controller's own gRPC server (gateway/answers.py): one loopback endpoint, HTTP/2."""
    directory = options.xds_dir
    return {
        "name": ANSWERS_CLUSTER,
        "type": "EDS",
        "eds_cluster_config": {"service_name": ANSWERS_CLUSTER, "eds_config": _config_source(
            f"{directory}/{eds_file(ANSWERS_CLUSTER)}", directory)},
        "connect_timeout": _seconds(options.connect_timeout_ms / 1000),
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    }


def _answers_routes(options: RenderOptions) -> list[Resource]:
    """ServerLive/Ready/Metadata and RepositoryIndex without a model header: the gateway answers."""
    if not options.answers_address:
        return []
    return [{"name": f"gateway/{path.rpartition('/')[2]}", "match": {"path": path, "grpc": {}},
             "route": {"cluster": ANSWERS_CLUSTER, "timeout": "5s",
                       "retry_policy": {"retry_on": "connect-failure,refused-stream,unavailable", "num_retries": 2}}}
            for path in ANSWERED_PATHS]


def _load_assignment(cluster: str, addresses: list[tuple[str, dict[str, Any]]]) -> Resource:
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": address, "hostname": instance_id}} for instance_id, address in addresses
    ]}]}


def _grpc_error(code: int, message: str) -> Resource:
    """A local reply that gRPC clients read as ``code`` with ``message`` (trailers-only response)."""
    return {
        "direct_response": {"status": 400, "body": {"inline_string": message}},
        "response_headers_to_add": [{"header": {"key": "grpc-status", "value": str(code)},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


def _match(name: str | None = None, version: int | None = None, version_present: bool = False,
           name_present: bool = False, version_invalid: bool = False) -> Resource:
    headers: list[Resource] = []
    if name is not None:
        headers.append({"name": MODEL_HEADER, "string_match": {"exact": name}})
    if name_present:
        headers.append({"name": MODEL_HEADER, "present_match": True})
    if version is not None:
        headers.append({"name": VERSION_HEADER, "string_match": {"exact": str(version)}})
    if version_present or version_invalid:
        headers.append({"name": VERSION_HEADER, "present_match": True})
    if version_invalid:
        # Envoy's safe_regex matches the whole value; an absent header never matches, inverted or not.
        headers.append({"name": VERSION_HEADER, "string_match": {"safe_regex": {"regex": VERSION_PATTERN}},
                        "invert_match": True})
    # gRPC requests only (content-type application/grpc[+…]): every other request goes on to the
    # REST routes and the final 404, never to a gRPC cluster.
    match: Resource = {"prefix": "/", "grpc": {}}
    if headers:
        match["headers"] = headers
    return match


def _route_action(model: str, weights: Mapping[int, int], sticky_header: str | None,
                  options: RenderOptions, *, cluster: Callable[[str, int], str] = cluster_name,
                  version_header: str = "OVERWRITE_IF_EXISTS_OR_ADD") -> Resource:
    """Weighted clusters over (version → weight); each adds ``x-model-version`` for its version.

    The header tells the service which version to run: a service holds several versions and
    would otherwise answer an unversioned request with its newest one, whatever the split says.
    """
    action: Resource = {
        "timeout": _seconds(options.route_timeout),
        "retry_policy": {
            # "unavailable" covers trailers-only UNAVAILABLE (a service shutting down); Envoy does not
            # see a gRPC status that arrives in trailers after a body.
            "retry_on": "unavailable,reset,connect-failure,refused-stream",
            "num_retries": options.num_retries,
            "per_try_timeout": _seconds(options.per_try_timeout),
            "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.2s"},
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            }}],
            "host_selection_retry_max_attempts": 5,
        },
    }
    weighted: Resource = {"clusters": [
        {"name": cluster(model, version), "weight": weight,
         "request_headers_to_add": [{"header": {"key": VERSION_HEADER, "value": str(version)},
                                     "append_action": version_header}]}
        for version, weight in weights.items()
    ]}
    if sticky_header is not None:
        # weighted_clusters.header_name wants a number; an arbitrary key goes through the hash policy.
        weighted["use_hash_policy"] = True
        action["hash_policy"] = [{"header": {"header_name": sticky_header}}]
    action["weighted_clusters"] = weighted
    return action


def _rate_limit(model: str, options: RenderOptions) -> Resource | None:
    rate = options.rate_limits.get(model)
    if rate is None:
        return None
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "sluice.rate_limit"}
    return {_RATE_LIMIT_FILTER: {
        "@type": _LOCAL_RATE_LIMIT,
        "stat_prefix": "sluice_rate_limit",
        "token_bucket": {"max_tokens": rate, "tokens_per_fill": rate, "fill_interval": "1s"},
        "filter_enabled": always,
        "filter_enforced": always,
        "rate_limited_as_resource_exhausted": True,
    }}


def _model_routes(name: str, plan: ModelPlan, serving: list[int], options: RenderOptions,
                  *, by_header: bool) -> list[Resource]:
    """Pin routes, the unknown-version route and the weighted route of one model."""
    header_name = name if by_header else None
    rate_limit = _rate_limit(name, options)
    routes: list[Resource] = []

    def add(route: Resource) -> None:
        if rate_limit is not None and "route" in route:
            route["typed_per_filter_config"] = rate_limit
        routes.append(route)

    for version in serving:
        add({"name": f"{name}/pin/v{version}", "match": _match(header_name, version),
             "route": _route_action(name, {version: 1}, None, options)})
    # After the pins, which match canonical versions only: anything else in the header is not a
    # version at all, INVALID_ARGUMENT as the service answers it (not "no such version").
    routes.append({"name": f"{name}/pin/invalid", "match": _match(header_name, version_invalid=True),
                   **_grpc_error(GRPC_INVALID_ARGUMENT, f"{VERSION_HEADER} must be {VERSION_RULE}")})
    listed = ", ".join(str(v) for v in serving) or "none"
    routes.append({"name": f"{name}/pin/unknown", "match": _match(header_name, version_present=True),
                   **_grpc_error(GRPC_NOT_FOUND, f"model {name!r} has no serving instances of the version in "
                                                 f"{VERSION_HEADER}; serving versions: {listed}")})
    if plan.weights:
        add({"name": f"{name}/split", "match": _match(header_name),
             "route": _route_action(name, plan.weights, plan.sticky_header, options)})
    else:
        routes.append({"name": f"{name}/unavailable", "match": _match(header_name),
                       **_grpc_error(GRPC_UNAVAILABLE, f"model {name!r} has no serving instances")})
    return routes


def _repository_control_routes(options: RenderOptions) -> list[Resource]:
    """Direct PERMISSION_DENIED replies for the repository control RPCs, unless they are allowed.

    They come before every model route: those match on headers only, so any client naming a
    model could otherwise unload it from every service behind the gateway.
    """
    if options.allow_repository_control:
        return []
    routes: list[Resource] = []
    for path in REPOSITORY_CONTROL_PATHS:
        method = path.rpartition("/")[2]
        routes.append({"name": f"repository-control/{method}", "match": {"path": path},
                       **_grpc_error(GRPC_PERMISSION_DENIED,
                                     f"{method} is not allowed through the gateway: repository control is "
                                     f"off; start the gateway with {REPOSITORY_CONTROL_SETTING} to route it "
                                     "to the model services")})
    return routes


def _rest_routes(plans: Mapping[str, ModelPlan], serving: Mapping[str, list[int]],
                 rest_serving: Mapping[str, list[int]], options: RenderOptions) -> list[Resource]:
    """The REST routes (gateway/rest_routes.py), each model's with its rate limit."""
    before, after = gateway_rest_routes(
        list(plans), [(name, v) for name in plans for v in serving[name]],
        routable=any(plan.weights and serving[name] for name, plan in plans.items()),
        control_setting=REPOSITORY_CONTROL_SETTING, allow_repository_control=options.allow_repository_control)
    routes = before

    def action(model: str, weights: Mapping[int, int], sticky_header: str | None, pinned: bool) -> Resource:
        # A pin keeps the client's own x-model-version: the service compares it with the path.
        return _route_action(model, weights, sticky_header, options, cluster=rest_cluster_name,
                             version_header="ADD_IF_ABSENT" if pinned else "OVERWRITE_IF_EXISTS_OR_ADD")

    for name, plan in plans.items():
        rate_limit = _rate_limit(name, options)
        model_routes = model_rest_routes(name, plan.weights, plan.sticky_header, rest_serving[name], action,
                                         allow_repository_control=options.allow_repository_control)
        for route in model_routes:
            if rate_limit is not None and "route" in route:
                route["typed_per_filter_config"] = rate_limit
        routes += _protect(model_routes, name, plan, options)
    return routes + after


def _protect(routes: list[Resource], name: str, plan: ModelPlan, options: RenderOptions) -> list[Resource]:
    """The model's routes with its authorization policy (gateway/auth.py; unchanged when off)."""
    access = plan.routing.access if plan.routing is not None else None
    return protect_model_routes(routes, name, access, options.auth,
                                allow_repository_control=options.allow_repository_control)


def _routes(plans: Mapping[str, ModelPlan], serving: Mapping[str, list[int]],
            rest_serving: Mapping[str, list[int]], options: RenderOptions) -> Resource:
    # gRPC first: the hot path is then compared with a few header rules, not with every REST
    # route's path regex. Each gRPC route matches gRPC requests only (``grpc`` in the match), and
    # one of them takes every gRPC request (the catch-alls below), so a REST request, even one
    # carrying x-model-name, goes on to the REST routes; what matches none of those gets a 404.
    routes: list[Resource] = _repository_control_routes(options)
    for name, plan in plans.items():
        routes += _protect(_model_routes(name, plan, serving[name], options, by_header=True), name, plan, options)
    names = ", ".join(plans) or "none"
    routes.append({"name": "unknown-model", "match": _match(name_present=True),
                   **_grpc_error(GRPC_NOT_FOUND, f"the model named in {MODEL_HEADER} is not served here; "
                                                 f"served models: {names}")})
    # No header (and none from the body): the RPCs about the whole server are the gateway's own.
    routes += _answers_routes(options)
    if len(plans) == 1:
        # One model: requests without the header are for it (single-model clients work unchanged).
        name, plan = next(iter(plans.items()))
        routes += _protect([{**r, "name": f"default/{r['name']}"}
                            for r in _model_routes(name, plan, serving[name], options, by_header=False)],
                           name, plan, options)
    elif plans:
        routes.append({"name": "missing-model-header", "match": _match(),
                       **_grpc_error(GRPC_INVALID_ARGUMENT, f"set header {MODEL_HEADER} to the model to call; "
                                                            f"served models: {names}")})
    else:
        routes.append({"name": "no-models", "match": _match(),
                       **_grpc_error(GRPC_UNAVAILABLE, "no model is registered with the gateway")})
    routes += _rest_routes(plans, serving, rest_serving, options)
    return {
        "name": ROUTE_CONFIG_NAME,
        # Envoy then rejects a route config naming a cluster it does not know, instead of 503s.
        "validate_clusters": True,
        "virtual_hosts": [{"name": "sluice", "domains": ["*"], "routes": open_routes(routes, options.auth)}],
    }
