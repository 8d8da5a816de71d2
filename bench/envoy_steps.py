"""The gateway's Envoy config built up one feature at a time, for ``bench.gateway_hop --steps``.

Each step is a static Envoy bootstrap (no xDS files, no controller): the first is a bare Envoy
with the router and one route to the service; every later step adds one feature of what
``sluice gateway`` renders, in the order below, and the last one is exactly the rendered
snapshot (``gateway.bootstrap.validation_config``) with tracing on, as ``sluice up`` runs it.
Timing each step side by side shows what each feature costs per request.

The variants are that last config with one earlier default put back (the REST routes first,
Envoy's span export every 5 spans, gRPC stats for every path) or one setting changed (1 %
sampling): timed in the same rounds, each shows what its change is worth.

Pure: ``step_configs`` and ``variant_config`` return config dicts; nothing here starts Envoy or
writes files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from gateway.bootstrap import validation_config
from gateway.render import default_render_options, render_snapshot
from gateway.snapshot import cluster_name
from mesh.registry.etcd.client import KeyValue
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord
from mesh.registry.state import build_state

Resource = dict[str, Any]

MODEL = "iris"
VERSION = 1
BODY_FILTERS = ("sluice.max_request_bytes", "sluice.body_model.extract", "sluice.body_model.headers")
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
GRPC_STATS_FILTER = "envoy.filters.http.grpc_stats"
HCM_SETTINGS = ("generate_request_id", "normalize_path", "merge_slashes", "stream_idle_timeout",
                "http2_protocol_options", "local_reply_config")
CLUSTER_SETTINGS = ("alt_stat_name", "lb_policy", "circuit_breakers", "outlier_detection", "health_checks",
                    "ignore_health_on_host_removal")


@dataclass(frozen=True)
class Step:
    name: str
    label: str
    """What this step adds to the one before, as the table shows it."""


STEPS = (
    Step("bare", "bare Envoy: router only, one route, plain cluster"),
    Step("routes", "+ sluice's route table (header matches, weighted cluster, version header, retries)"),
    Step("clusters", "+ cluster settings (health checks, outlier detection, circuit breakers, least request)"),
    Step("hcm", "+ HCM settings (request ids, path normalisation, local reply mappers)"),
    Step("access-log", "+ JSON access log"),
    Step("grpc-stats", "+ grpc_stats filter"),
    Step("rate-limit", "+ local rate limit (a bucket that never runs dry)"),
    Step("buffer", "+ buffer filter (request size cap)"),
    Step("body-filters", "+ body routing filters, skipped by the header (= sluice gateway's config)"),
    Step("tracing", "+ OpenTelemetry tracing, 100 % sampled (as `sluice up`)"),
)
STEP_NAMES = tuple(step.name for step in STEPS)

VARIANTS = (
    Step("rest-first", "before: REST routes first, gRPC routes matched on headers alone"),
    Step("flush-5", "before: a span export call every 5 spans (Envoy's default)"),
    Step("stats-all-methods", "before: grpc_stats with stats_for_all_methods"),
    Step("sampling-1", "tracing 1 % sampled"),
)
"""Variants of the whole config (the last step), each timed against it."""
VARIANT_NAMES = tuple(variant.name for variant in VARIANTS)


def full_config(service_address: str, *, listen_port: int, admin_port: int, access_log: str,
                otlp_endpoint: str) -> Resource:
    """What ``sluice gateway`` renders for one iris v1 instance, as one static bootstrap."""
    schema = KeySchema()
    record = InstanceRecord(address=service_address, model=MODEL, version=VERSION, instance_id="bench-steps")
    value = record.to_json()
    state = build_state(schema, 2, [KeyValue(schema.instance(MODEL, VERSION, record.instance_id).encode(),
                                             value, 1, 1, 1, 0)])
    options = default_render_options(xds_dir="/nonexistent", listen_host="127.0.0.1", listen_port=listen_port,
                                     access_log=access_log, otlp_endpoint=otlp_endpoint,
                                     # Far above what one connection can send: the filter runs, never refuses.
                                     rate_limits={MODEL: 10_000_000})
    return validation_config(render_snapshot(state, {}, options), admin_port)


def _hcm(config: Resource) -> Resource:
    hcm: Resource = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _without_filters(hcm: Resource, names: tuple[str, ...]) -> None:
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in names]


def _routes(hcm: Resource) -> list[Resource]:
    routes: list[Resource] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def step_config(full: Resource, step: str) -> Resource:
    """``full`` with every feature after ``step`` taken out (``step`` from :data:`STEP_NAMES`)."""
    if step not in STEP_NAMES:
        raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEP_NAMES)}")
    keep = STEP_NAMES[: STEP_NAMES.index(step) + 1]
    config = copy.deepcopy(full)
    hcm = _hcm(config)
    if "tracing" not in keep:
        hcm.pop("tracing", None)
    if "body-filters" not in keep:
        _without_filters(hcm, BODY_FILTERS[1:])
    if "buffer" not in keep:
        _without_filters(hcm, BODY_FILTERS[:1])
    if "rate-limit" not in keep:
        _without_filters(hcm, (RATE_LIMIT_FILTER,))
        for route in _routes(hcm):
            route.pop("typed_per_filter_config", None)
    if "grpc-stats" not in keep:
        _without_filters(hcm, (GRPC_STATS_FILTER,))
    if "access-log" not in keep:
        hcm.pop("access_log", None)
    if "hcm" not in keep:
        for key in HCM_SETTINGS:
            hcm.pop(key, None)
        # Envoy generates request ids unless told not to: the bare hop does without.
        hcm["generate_request_id"] = False
    clusters: list[Resource] = config["static_resources"]["clusters"]
    if "clusters" not in keep:
        for cluster in clusters:
            for key in CLUSTER_SETTINGS:
                cluster.pop(key, None)
    if "routes" not in keep:
        target = cluster_name(MODEL, VERSION)
        hcm["route_config"] = {"name": "bare", "virtual_hosts": [{"name": "bare", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": target, "timeout": "60s"}}]}]}
        config["static_resources"]["clusters"] = [c for c in clusters if c["name"] == target]
    return config


def variant_config(full: Resource, variant: str) -> Resource:
    """``full`` with the one change of ``variant`` (from :data:`VARIANT_NAMES`)."""
    config = copy.deepcopy(full)
    hcm = _hcm(config)
    if variant == "rest-first":
        routes = _routes(hcm)
        rest = [route for route in routes if route["name"].startswith("rest/")]
        for route in rest:
            if route["name"] == "rest/unknown-endpoint":
                route["match"] = {"prefix": "/v2/"}
        grpc = [{**route, "match": {k: v for k, v in route["match"].items() if k != "grpc"}}
                for route in routes if not route["name"].startswith("rest/")]
        hcm["route_config"]["virtual_hosts"][0]["routes"] = rest + grpc
    elif variant == "flush-5":
        config["layered_runtime"]["layers"] = [layer for layer in config["layered_runtime"]["layers"]
                                               if "static_layer" not in layer]
    elif variant == "stats-all-methods":
        stats = next(f for f in hcm["http_filters"] if f["name"] == GRPC_STATS_FILTER)["typed_config"]
        stats.pop("individual_method_stats_allowlist")
        stats["stats_for_all_methods"] = True
    elif variant == "sampling-1":
        hcm["tracing"]["random_sampling"] = {"value": 1.0}
    else:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANT_NAMES)}")
    return config


def step_configs(full: Resource) -> dict[str, Resource]:
    """Every step's config, in order."""
    return {name: step_config(full, name) for name in STEP_NAMES}


def with_ports(config: Resource, *, listen_port: int, admin_port: int) -> Resource:
    """``config`` listening on ``listen_port`` with its admin API on ``admin_port``."""
    moved = copy.deepcopy(config)
    moved["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen_port
    moved["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return moved
