"""The snapshot is a pure function of the registry state: routes, clusters, weights, checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.bootstrap import validation_config
from gateway.envoy import find_envoy, validate_snapshot
from gateway.errors import EnvoyValidationError, InconsistentSnapshotError
from gateway.publish import Publisher, load_published
from gateway.render import default_render_options, render_snapshot
from gateway.snapshot import (
    CONFIG_VERSION_HEADER,
    Snapshot,
    consistency_problems,
    shape_key,
    snapshot_from_files,
    transition,
)
from gateway.status import status_documents
from mesh.registry.etcd.client import KeyValue
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, InstanceState, RoutingDocument
from mesh.registry.state import RegistryState, build_state

SCHEMA = KeySchema()
OPTIONS = default_render_options(xds_dir="/tmp/sluice-xds", listen_host="127.0.0.1", listen_port=8080)


def kv(key: str, value: bytes, revision: int = 1) -> KeyValue:
    return KeyValue(key.encode(), value, revision, revision, 1, 0)


def instance(model: str, version: int, instance_id: str, port: int, *, address: str = "127.0.0.1",
             state: InstanceState = InstanceState.SERVING) -> KeyValue:
    record = InstanceRecord(address=f"{address}:{port}", model=model, version=version, instance_id=instance_id,
                            state=state)
    return kv(SCHEMA.instance(model, version, instance_id), record.to_json())


def routing(model: str, document: dict[str, Any] | str) -> KeyValue:
    raw = document if isinstance(document, str) else json.dumps(document)
    return kv(SCHEMA.routing(model), raw.encode())


def state(*items: KeyValue, revision: int = 10) -> RegistryState:
    return build_state(SCHEMA, revision, list(items))


def routes_by_name(snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in snapshot.routes["virtual_hosts"][0]["routes"]}


def route_names(snapshot: Snapshot) -> list[str]:
    """The gRPC routes in order (the REST routes come after them: tests/gateway/test_rest_routes.py)."""
    return [r["name"] for r in snapshot.routes["virtual_hosts"][0]["routes"] if not r["name"].startswith("rest/")]


IRIS = (instance("iris", 1, "a", 7001), instance("iris", 1, "b", 7002), instance("iris", 2, "c", 7003))


def test_render_is_pure_and_versioned_by_content() -> None:
    one = render_snapshot(state(*IRIS), {}, OPTIONS)
    two = render_snapshot(state(*IRIS), {}, OPTIONS)
    assert one == two and one.files() == two.files()
    later = render_snapshot(state(*IRIS, revision=11), {}, OPTIONS)
    assert later.version != one.version and later.content_hash == one.content_hash


def test_weighted_clusters_pin_routes_and_order() -> None:
    snapshot = render_snapshot(state(*IRIS, routing("iris", {"weights": {"1": 80, "2": 20}})), {}, OPTIONS)
    assert set(snapshot.clusters) == {"iris.v1", "iris.v2"}
    routes = routes_by_name(snapshot)
    split = routes["iris/split"]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["weight"]) for c in split] == [("iris.v1", 80), ("iris.v2", 20)]
    # Each cluster tells the service which version to run (it serves several).
    assert [c["request_headers_to_add"][0]["header"] for c in split] == [
        {"key": "x-model-version", "value": "1"}, {"key": "x-model-version", "value": "2"}]
    # Pins come before the split; the catch-alls for one model come after the header routes (the
    # repository control refusals come first of all).
    assert route_names(snapshot)[:7] == [*CONTROL_ROUTES, "iris/pin/v1", "iris/pin/v2", "iris/pin/invalid",
                                         "iris/pin/unknown", "iris/split"]
    assert [c["name"] for c in routes["iris/pin/v2"]["route"]["weighted_clusters"]["clusters"]] == ["iris.v2"]
    assert {"name": "x-model-version", "string_match": {"exact": "2"}} in routes["iris/pin/v2"]["match"]["headers"]
    assert "default/iris/split" in routes  # one model: no header needed
    assert snapshot.routes["validate_clusters"] is True
    assert consistency_problems(snapshot) == []
    endpoints = snapshot.endpoints["iris.v1"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [7001, 7002]
    health = snapshot.clusters["iris.v1"]["health_checks"][0]
    assert health["grpc_health_check"] == {"service_name": "iris"}


def test_a_version_header_that_is_no_version_is_invalid_argument_after_the_pins() -> None:
    routes = routes_by_name(render_snapshot(state(*IRIS), {}, OPTIONS))
    invalid = routes["iris/pin/invalid"]
    assert invalid["match"]["headers"] == [
        {"name": "x-model-name", "string_match": {"exact": "iris"}},
        {"name": "x-model-version", "present_match": True},
        {"name": "x-model-version", "string_match": {"safe_regex": {"regex": "[1-9][0-9]{0,17}"}},
         "invert_match": True}]
    assert invalid["response_headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "3"}
    assert "x-model-version must be a positive integer" in invalid["direct_response"]["body"]["inline_string"]
    assert "default/iris/pin/invalid" in routes  # one model: also without x-model-name


def test_no_routing_document_sends_all_to_newest_serving_version() -> None:
    snapshot = render_snapshot(state(*IRIS), {}, OPTIONS)
    assert dict(snapshot.plans["iris"].weights) == {2: 100}
    only = routes_by_name(snapshot)["iris/split"]["route"]["weighted_clusters"]["clusters"]
    assert [(c["name"], c["request_headers_to_add"][0]["header"]["value"]) for c in only] == [("iris.v2", "2")]


def test_weighted_version_without_instances_is_dropped_with_a_warning() -> None:
    snapshot = render_snapshot(state(*IRIS, routing("iris", {"weights": {"1": 50, "3": 50}})), {}, OPTIONS)
    plan = snapshot.plans["iris"]
    assert dict(plan.weights) == {1: 50}
    assert any("version 3 has weight 50 but no serving instances" in w for w in plan.warnings)
    assert "iris.v3" not in snapshot.clusters and consistency_problems(snapshot) == []


@pytest.mark.parametrize("not_ready", [InstanceState.DRAINING, InstanceState.FAILED])
def test_draining_or_failed_instances_get_no_traffic_but_keep_their_cluster(not_ready: InstanceState) -> None:
    items = (instance("iris", 1, "a", 7001), instance("iris", 2, "c", 7003, state=not_ready))
    snapshot = render_snapshot(state(*items), {}, OPTIONS)
    assert dict(snapshot.plans["iris"].weights) == {1: 100}
    assert "iris.v2" in snapshot.clusters
    assert snapshot.endpoints["iris.v2"]["endpoints"][0]["lb_endpoints"] == []
    assert "iris/pin/v2" not in routes_by_name(snapshot)


def test_sticky_split_uses_the_route_hash_policy() -> None:
    doc = {"weights": {"1": 50, "2": 50}, "sticky_header": "x-user"}
    action = routes_by_name(render_snapshot(state(*IRIS, routing("iris", doc)), {}, OPTIONS))["iris/split"]["route"]
    assert action["weighted_clusters"]["use_hash_policy"] is True
    assert "header_name" not in action["weighted_clusters"]
    assert action["hash_policy"] == [{"header": {"header_name": "x-user"}}]


def test_invalid_routing_document_keeps_the_last_good_one() -> None:
    bad = state(*IRIS, routing("iris", '{"weights": {"1": "lots"}}'))
    last_good = RoutingDocument.from_weights({1: 90, 2: 10})
    plan = render_snapshot(bad, {"iris": last_good}, OPTIONS).plans["iris"]
    assert dict(plan.weights) == {1: 90, 2: 10} and plan.routing_source == "last-good"
    assert any("invalid routing document" in e for e in plan.errors)
    assert any("last good routing stays in force" in e for e in plan.errors)
    # Without a last good document: the newest serving version, and the error says so.
    plan = render_snapshot(bad, {}, OPTIONS).plans["iris"]
    assert dict(plan.weights) == {2: 100} and any("no earlier routing" in e for e in plan.errors)


def test_model_header_errors() -> None:
    two = render_snapshot(state(*IRIS, instance("mlp", 1, "m", 7010)), {}, OPTIONS)
    routes = routes_by_name(two)
    missing = routes["missing-model-header"]
    assert "match" in missing and "headers" not in missing["match"]
    assert "set header x-model-name" in missing["direct_response"]["body"]["inline_string"]
    assert missing["response_headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "3"}
    assert route_names(two)[-1] == "missing-model-header"
    assert not any(name.startswith("default/") for name in routes)
    empty = render_snapshot(state(), {}, OPTIONS)
    assert route_names(empty) == [*CONTROL_ROUTES, "unknown-model", "no-models"]


CONTROL_ROUTES = ["repository-control/RepositoryModelLoad", "repository-control/RepositoryModelUnload"]


@pytest.mark.parametrize("method", ["RepositoryModelLoad", "RepositoryModelUnload"])
def test_repository_control_is_refused_before_any_model_route_by_default(method: str) -> None:
    snapshot = render_snapshot(state(*IRIS, instance("mlp", 1, "m", 7010)), {}, OPTIONS)
    names = route_names(snapshot)
    route = routes_by_name(snapshot)[f"repository-control/{method}"]
    # Model routes match on headers alone: the refusal must come first or x-model-name wins.
    assert names.index(f"repository-control/{method}") < names.index("iris/pin/v1")
    assert route["match"] == {"path": f"/inference.GRPCInferenceService/{method}"}
    assert route["response_headers_to_add"][0]["header"] == {"key": "grpc-status", "value": "7"}
    message = route["direct_response"]["body"]["inline_string"]
    assert method in message and "--allow-repository-control" in message
    assert "SLUICE_GATEWAY_ALLOW_REPOSITORY_CONTROL" in message
    assert consistency_problems(snapshot) == []
    hcm = snapshot.listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True  # no way around the exact match


def test_repository_control_routes_like_any_call_when_allowed() -> None:
    options = default_render_options(xds_dir="/tmp/sluice-xds", allow_repository_control=True)
    snapshot = render_snapshot(state(*IRIS), {}, options)
    assert not any(name.startswith("repository-control/") for name in route_names(snapshot))
    assert route_names(snapshot)[0] == "iris/pin/v1"


def test_grpc_stats_name_the_services_methods_and_no_client_path() -> None:
    hcm = render_snapshot(state(*IRIS), {}, OPTIONS).listener["filter_chains"][0]["filters"][0]["typed_config"]
    stats = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_stats")["typed_config"]
    assert "stats_for_all_methods" not in stats  # a stat name per path a client sends: unbounded
    [service] = stats["individual_method_stats_allowlist"]["services"]
    assert service["name"] == "inference.GRPCInferenceService"
    assert {"ModelInfer", "ModelStreamInfer", "ModelReady", "RepositoryIndex"} <= set(service["method_names"])
    assert len(service["method_names"]) == len(set(service["method_names"])) == 20


def test_every_grpc_route_but_the_repository_refusals_takes_grpc_requests_only() -> None:
    for allowed in (False, True):
        options = default_render_options(xds_dir="/tmp/x", allow_repository_control=allowed,
                                         answers_address="127.0.0.1:7999")
        for models in ((), IRIS, (*IRIS, instance("mlp", 1, "m", 7004))):
            for route in routes_by_name(render_snapshot(state(*models), {}, options)).values():
                if not route["name"].startswith(("rest/", "repository-control/")):
                    assert route["match"].get("grpc") == {}, route["name"]


def test_non_ip_addresses_are_left_out_with_a_warning() -> None:
    snapshot = render_snapshot(state(instance("iris", 1, "a", 7001, address="iris-0.svc")), {}, OPTIONS)
    assert snapshot.endpoints["iris.v1"]["endpoints"][0]["lb_endpoints"] == []
    assert any("is not IP:port" in w for w in snapshot.plans["iris"].warnings)


def test_rate_limit_is_rendered_per_model_route() -> None:
    options = default_render_options(xds_dir="/x", rate_limits={"iris": 5})
    routes = routes_by_name(render_snapshot(state(*IRIS), {}, options))
    bucket = routes["iris/split"]["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]["token_bucket"]
    assert bucket == {"max_tokens": 5, "tokens_per_fill": 5, "fill_interval": "1s"}


def test_consistency_catches_a_route_to_a_missing_cluster() -> None:
    snapshot = render_snapshot(state(*IRIS), {}, OPTIONS)
    broken = Snapshot(snapshot.version, snapshot.revision, snapshot.listener,
                      {k: v for k, v in snapshot.clusters.items() if k != "iris.v2"},
                      {k: v for k, v in snapshot.endpoints.items() if k != "iris.v2"}, snapshot.routes)
    assert any("iris.v2" in p for p in consistency_problems(broken))


def test_shape_ignores_weights_only() -> None:
    a = render_snapshot(state(*IRIS, routing("iris", {"weights": {"1": 80, "2": 20}})), {}, OPTIONS)
    b = render_snapshot(state(*IRIS, routing("iris", {"weights": {"1": 10, "2": 90}}), revision=12), {}, OPTIONS)
    c = render_snapshot(state(*IRIS[:2], routing("iris", {"weights": {"1": 80, "2": 20}})), {}, OPTIONS)
    assert shape_key(a) == shape_key(b) != shape_key(c)


def test_transition_adds_clusters_before_routes_and_removes_them_after() -> None:
    old = render_snapshot(state(*IRIS[:2]), {}, OPTIONS)
    new = render_snapshot(state(*IRIS, routing("iris", {"weights": {"2": 100}})), {}, OPTIONS)
    steps = transition(old, new)
    assert len(steps) == 2 and set(steps[0].clusters) == {"iris.v1", "iris.v2"}
    assert steps[0].route_clusters() == {"iris.v1"} and steps[-1] == new
    back = transition(new, render_snapshot(state(IRIS[2]), {}, OPTIONS))
    assert len(back) == 2 and set(back[0].clusters) == {"iris.v1", "iris.v2"}
    assert back[0].route_clusters() == {"iris.v2"}
    assert all(consistency_problems(step) == [] for step in [*steps, *back])


def test_status_reports_live_weights_and_failures() -> None:
    live = render_snapshot(state(*IRIS, routing("iris", {"weights": {"1": 80, "2": 20}})), {}, OPTIONS)
    wanted = render_snapshot(state(*IRIS, routing("iris", {"weights": {"1": 10, "3": 90}}), revision=20), {}, OPTIONS)
    status = status_documents(wanted, live, None, failure="Envoy rejected it")["iris"]
    assert status.effective_weights == {1: 80, 2: 20} and status.envoy_config_version == live.version
    assert status.applied_revision == 10 and "Envoy rejected it" in status.errors
    assert any("version 3" in w for w in status.warnings)


def test_status_names_the_routing_revision_rendered_even_when_no_route_changes() -> None:
    # {"9": 50} for a version without instances renders what {"2": 100} did: nothing is published,
    # yet the status must answer for the new document (it named the old one before).
    live = render_snapshot(state(*IRIS, kv(SCHEMA.routing("iris"), b'{"weights": {"2": 100}}', revision=7)),
                           {}, OPTIONS)
    wanted = render_snapshot(state(*IRIS, kv(SCHEMA.routing("iris"), b'{"weights": {"9": 50}}', revision=12),
                                   revision=12), {}, OPTIONS)
    assert wanted.content_hash == live.content_hash
    status = status_documents(wanted, live, None)["iris"]
    assert status.routing == RoutingDocument.from_weights({9: 50})
    assert (status.routing_revision, status.routing_source, status.applied_revision) == (12, "document", 12)
    assert status.effective_weights == {2: 100} and status.envoy_config_version == live.version
    assert "no weighted version is serving: all traffic to version 2" in status.warnings
    # A publish that failed leaves the live plan's document and revision in the status.
    other = render_snapshot(state(*IRIS, kv(SCHEMA.routing("iris"), b'{"weights": {"1": 50}}', revision=13),
                                  revision=13), {}, OPTIONS)
    failed = status_documents(other, live, None, failure="Envoy rejected it")["iris"]
    assert failed.routing_revision == 7 and failed.routing == RoutingDocument.from_weights({2: 100})


def test_publish_layout_and_reload_from_disk(tmp_path: Path) -> None:
    options = default_render_options(xds_dir=str(tmp_path / "xds"))
    snapshot = render_snapshot(state(*IRIS), {}, options)
    publisher = Publisher(tmp_path / "xds")
    first = publisher.publish(snapshot.files())
    data = tmp_path / "xds" / "..data"
    assert data.is_symlink() and data.resolve() == first.resolve()
    assert (tmp_path / "xds" / "rds.yaml").resolve() == (first / "rds.yaml").resolve()
    smaller = render_snapshot(state(IRIS[0]), {}, options)
    publisher.publish(smaller.files())
    publisher.publish(smaller.files())
    publisher.cleanup()
    names = {p.name for p in (tmp_path / "xds").iterdir()}
    assert "eds-iris.v2.yaml" not in names and len([n for n in names if n.startswith("..2")]) == 2
    again = snapshot_from_files(load_published(tmp_path / "xds"))
    assert again is not None and again.content_hash == smaller.content_hash and again.version == smaller.version


@pytest.mark.slow
async def test_real_envoy_accepts_rendered_snapshots_and_rejects_a_broken_one() -> None:
    binary = find_envoy()
    doc = {"weights": {"1": 70, "2": 30}, "sticky_header": "x-user"}
    options = default_render_options(xds_dir="/tmp/x", rate_limits={"iris": 10}, access_log="/tmp/access.log")
    await validate_snapshot(binary, render_snapshot(state(*IRIS, routing("iris", doc)), {}, options))
    await validate_snapshot(binary, render_snapshot(state(), {}, OPTIONS))
    good = render_snapshot(state(*IRIS), {}, OPTIONS)
    broken = Snapshot(good.version, good.revision, good.listener,
                      {**good.clusters, "iris.v1": {**good.clusters["iris.v1"], "lb_policy": "NOT_A_POLICY"}},
                      good.endpoints, good.routes)
    with pytest.raises(EnvoyValidationError, match=r"NOT_A_POLICY|lb_policy"):
        await validate_snapshot(binary, broken)
    assert "static_resources" in validation_config(good)


def test_snapshot_is_immutable_and_its_version_header_is_added_when_written() -> None:
    snapshot = render_snapshot(state(*IRIS), {}, OPTIONS)
    with pytest.raises(TypeError, match="immutable"):
        snapshot.clusters["iris.v1"]["lb_policy"] = "RANDOM"
    with pytest.raises(TypeError, match="immutable"):
        snapshot.routes["virtual_hosts"][0]["routes"].append({})
    assert "response_headers_to_add" not in snapshot.routes
    written = snapshot_from_files({name: yaml.safe_load(data) for name, data in snapshot.files().items()})
    assert written is not None and written.version == snapshot.version and written.routes == snapshot.routes
    header = snapshot.route_config()["response_headers_to_add"][0]["header"]
    assert header == {"key": CONFIG_VERSION_HEADER, "value": snapshot.version}
    rebuilt = Snapshot.build(snapshot.revision, listener=snapshot.listener, clusters=snapshot.clusters,
                             endpoints=snapshot.endpoints, routes=snapshot.routes, plans=snapshot.plans)
    assert rebuilt == snapshot
    broken = Snapshot.build(snapshot.revision, listener=snapshot.listener, clusters={}, endpoints={},
                            routes=snapshot.routes)
    with pytest.raises(InconsistentSnapshotError, match=r"iris\.v1"):
        broken.consistent()
