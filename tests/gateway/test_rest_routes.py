"""KServe v2 REST routes and clusters in the rendered snapshot (pure), checked by the real Envoy."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gateway.envoy import find_envoy, validate_snapshot
from gateway.render import default_render_options, render_snapshot
from gateway.rest_routes import SERVER_NAME
from gateway.snapshot import Snapshot, consistency_problems
from gateway.status import status_documents
from mesh.registry.etcd.client import KeyValue
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, InstanceState
from mesh.registry.state import RegistryState, build_state

SCHEMA = KeySchema()
OPTIONS = default_render_options(xds_dir="/tmp/sluice-xds", listen_host="127.0.0.1", listen_port=8080)


def kv(key: str, value: bytes) -> KeyValue:
    return KeyValue(key.encode(), value, 1, 1, 1, 0)


def instance(model: str, version: int, instance_id: str, port: int, *, rest: bool = True,
             state: InstanceState = InstanceState.SERVING) -> KeyValue:
    record = InstanceRecord(address=f"127.0.0.1:{port}", model=model, version=version, instance_id=instance_id,
                            state=state, rest_address=f"127.0.0.1:{port + 2}" if rest else None)
    return kv(SCHEMA.instance(model, version, instance_id), record.to_json())


def routing(model: str, weights: dict[str, int], sticky: str | None = None) -> KeyValue:
    doc: dict[str, Any] = {"weights": weights}
    if sticky is not None:
        doc["sticky_header"] = sticky
    return kv(SCHEMA.routing(model), json.dumps(doc).encode())


def state(*items: KeyValue) -> RegistryState:
    return build_state(SCHEMA, 10, list(items))


def routes(snapshot: Snapshot) -> list[dict[str, Any]]:
    return list(snapshot.routes["virtual_hosts"][0]["routes"])


def header_matches(rule: dict[str, Any], headers: dict[str, str]) -> bool:
    value = headers.get(rule["name"])
    if value is None:
        return False  # Envoy: an absent header never matches, inverted or not
    if rule.get("present_match"):
        return True
    string_match = rule["string_match"]
    hit = value == string_match["exact"] if "exact" in string_match else \
        re.fullmatch(string_match["safe_regex"]["regex"], value) is not None
    return hit != bool(rule.get("invert_match"))


GRPC_CONTENT_TYPE = re.compile(r"application/grpc([+;].*)?")
"""What Envoy's ``grpc`` route match takes for a gRPC request (Grpc::Common::isGrpcRequestHeaders)."""


def route_for(snapshot: Snapshot, path: str, method: str = "POST",
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The first route Envoy would pick (anchored regexes, header rules as Envoy reads them)."""
    request = {":method": method, "content-type": "application/json", **(headers or {})}
    for route in routes(snapshot):
        match = route["match"]
        if "grpc" in match and GRPC_CONTENT_TYPE.fullmatch(request["content-type"]) is None:
            continue
        if "safe_regex" in match:
            if re.fullmatch(match["safe_regex"]["regex"], path) is None:
                continue
        elif "prefix" in match:
            if not path.startswith(match["prefix"]):
                continue
        elif match.get("path") != path:
            continue
        if all(header_matches(rule, request) for rule in match.get("headers", [])):
            return route
    raise AssertionError(f"no route for {method} {path}")


def body(route: dict[str, Any]) -> tuple[int, Any]:
    reply = route["direct_response"]
    assert {"key": "content-type", "value": "application/json"} in [h["header"] for h in
                                                                   route["response_headers_to_add"]]
    return reply["status"], json.loads(reply["body"]["inline_string"])


def clusters_of(route: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [(c["name"], c["weight"], c["request_headers_to_add"][0]["header"]["value"])
            for c in route["route"]["weighted_clusters"]["clusters"]]


IRIS = (instance("iris", 1, "a", 7001), instance("iris", 1, "b", 7011), instance("iris", 2, "c", 7021))


def test_each_version_with_rest_gets_an_http1_cluster_checked_on_its_ready_path() -> None:
    snapshot = render_snapshot(state(*IRIS, instance("mlp", 1, "m", 7031, rest=False)), {}, OPTIONS)
    assert set(snapshot.clusters) == {"iris.v1", "iris.v2", "iris.v1.rest", "iris.v2.rest", "mlp.v1"}
    rest, grpc = snapshot.clusters["iris.v2.rest"], snapshot.clusters["iris.v2"]
    assert "typed_extension_protocol_options" not in rest  # HTTP/1.1 upstream
    assert rest["health_checks"][0]["http_health_check"] == {"path": "/v2/models/iris/versions/2/ready"}
    assert rest["circuit_breakers"] == grpc["circuit_breakers"]
    assert rest["outlier_detection"] == grpc["outlier_detection"]
    assert rest["alt_stat_name"] == "iris_v2_rest"
    eds = rest["eds_cluster_config"]["eds_config"]["path_config_source"]["path"]
    assert eds == "/tmp/sluice-xds/eds-iris.v2.rest.yaml"
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in snapshot.endpoints["iris.v1.rest"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [7003, 7013]
    assert consistency_problems(snapshot) == []
    assert "eds-iris.v1.rest.yaml" in snapshot.files()


def test_unversioned_paths_split_like_grpc_and_tell_the_service_the_version() -> None:
    snapshot = render_snapshot(state(*IRIS, routing("iris", {"1": 80, "2": 20}, sticky="x-user")), {}, OPTIONS)
    for path in ("/v2/models/iris/infer", "/v2/models/iris", "/v2/models/iris/ready", "/v2/models/iris/config",
                 "/v2/models/iris/stats"):
        route = route_for(snapshot, path)
        assert route["name"] == "rest/iris/split"
        assert clusters_of(route) == [("iris.v1.rest", 80, "1"), ("iris.v2.rest", 20, "2")]
        assert route["route"]["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    grpc = {r["name"]: r for r in routes(snapshot)}["iris/split"]["route"]
    rest = route_for(snapshot, "/v2/models/iris/infer")["route"]
    assert rest["retry_policy"] == grpc["retry_policy"] and rest["timeout"] == grpc["timeout"]


def test_versioned_paths_pin_and_unknown_or_invalid_versions_are_refused() -> None:
    snapshot = render_snapshot(state(*IRIS), {}, OPTIONS)
    assert clusters_of(route_for(snapshot, "/v2/models/iris/versions/2/infer")) == [("iris.v2.rest", 1, "2")]
    assert clusters_of(route_for(snapshot, "/v2/models/iris/versions/1", "GET")) == [("iris.v1.rest", 1, "1")]
    status, doc = body(route_for(snapshot, "/v2/models/iris/versions/7/infer"))
    assert status == 404 and "serving versions: 1, 2" in doc["error"]
    status, doc = body(route_for(snapshot, "/v2/models/iris/versions/01/infer"))
    assert status == 400 and "positive integer" in doc["error"]
    # A pin keeps the client's own x-model-version, so the service can refuse one that disagrees.
    pinned = route_for(snapshot, "/v2/models/iris/versions/2/infer")["route"]["weighted_clusters"]["clusters"]
    assert pinned[0]["request_headers_to_add"][0]["append_action"] == "ADD_IF_ABSENT"


def test_x_model_version_on_an_unversioned_path_pins_as_for_grpc() -> None:
    snapshot = render_snapshot(state(*IRIS, routing("iris", {"1": 80, "2": 20})), {}, OPTIONS)
    route = route_for(snapshot, "/v2/models/iris/infer", headers={"x-model-version": "2"})
    assert route["name"] == "rest/iris/header-pin/v2" and clusters_of(route) == [("iris.v2.rest", 1, "2")]
    status, doc = body(route_for(snapshot, "/v2/models/iris/infer", headers={"x-model-version": "5"}))
    assert status == 404 and "serving versions: 1, 2" in doc["error"]
    status, doc = body(route_for(snapshot, "/v2/models/iris/ready", "GET", headers={"x-model-version": "x"}))
    assert status == 400 and "x-model-version must be" in doc["error"]
    # The split overwrites nothing a client sent: without the header it adds its own choice.
    split = route_for(snapshot, "/v2/models/iris/infer")["route"]["weighted_clusters"]["clusters"]
    assert {c["request_headers_to_add"][0]["append_action"] for c in split} == {"OVERWRITE_IF_EXISTS_OR_ADD"}
    # A model name with a dot is matched literally.
    dotted = render_snapshot(state(instance("a.b", 1, "x", 7041)), {}, OPTIONS)
    assert route_for(dotted, "/v2/models/a.b/infer")["name"] == "rest/a.b/split"
    assert route_for(dotted, "/v2/models/aXb/infer")["name"] == "rest/unknown-model"


def test_unknown_models_and_models_without_instances() -> None:
    snapshot = render_snapshot(state(*IRIS, instance("mlp", 1, "m", 7031, state=InstanceState.DRAINING)), {},
                               OPTIONS)
    status, doc = body(route_for(snapshot, "/v2/models/resnet/infer"))
    assert status == 404 and "served models: iris, mlp" in doc["error"]
    status, doc = body(route_for(snapshot, "/v2/models/mlp/infer"))
    assert status == 503 and "'mlp' has no serving instances" in doc["error"]
    status, doc = body(route_for(snapshot, "/v2/nothing/here", "GET"))
    assert status == 404 and "no KServe v2 endpoint" in doc["error"]
    # A served model (and a served version) with an unknown endpoint: not "not served here".
    for path in ("/v2/models/iris/frobnicate", "/v2/models/iris/versions/2/frobnicate"):
        status, doc = body(route_for(snapshot, path))
        assert status == 404 and "no KServe v2 endpoint" in doc["error"], path
    status, doc = body(route_for(snapshot, "/v2/models/iris/versions/3/frobnicate"))
    assert status == 404 and "serving versions: 1, 2" in doc["error"]


def test_a_version_without_rest_is_left_out_of_the_rest_split() -> None:
    snapshot = render_snapshot(state(instance("iris", 1, "a", 7001), instance("iris", 2, "c", 7021, rest=False),
                                     routing("iris", {"1": 50, "2": 50})), {}, OPTIONS)
    assert clusters_of(route_for(snapshot, "/v2/models/iris/infer")) == [("iris.v1.rest", 50, "1")]
    assert body(route_for(snapshot, "/v2/models/iris/versions/2/infer"))[0] == 404


def test_health_metadata_and_index_are_answered_by_the_gateway() -> None:
    snapshot = render_snapshot(state(*IRIS, instance("mlp", 1, "m", 7031)), {}, OPTIONS)
    assert body(route_for(snapshot, "/v2/health/live", "GET"))[0] == 200
    assert body(route_for(snapshot, "/v2/health/ready", "GET"))[0] == 200
    status, doc = body(route_for(snapshot, "/v2", "GET"))
    assert status == 200 and doc["name"] == SERVER_NAME
    status, doc = body(route_for(snapshot, "/v2/repository/index"))
    assert status == 200
    assert [(m["name"], m["version"], m["state"]) for m in doc] == [
        ("iris", "1", "READY"), ("iris", "2", "READY"), ("mlp", "1", "READY")]
    draining = render_snapshot(state(instance("iris", 1, "a", 7001, state=InstanceState.DRAINING)), {}, OPTIONS)
    assert body(route_for(draining, "/v2/health/ready", "GET"))[0] == 503
    assert body(route_for(draining, "/v2/repository/index"))[1] == []
    assert body(route_for(render_snapshot(state(), {}, OPTIONS), "/v2/health/ready", "GET"))[0] == 503


def test_repository_control_over_rest_is_refused_unless_allowed() -> None:
    snapshot = render_snapshot(state(*IRIS), {}, OPTIONS)
    for operation in ("load", "unload"):
        status, doc = body(route_for(snapshot, f"/v2/repository/models/iris/{operation}"))
        assert status == 403 and "--allow-repository-control" in doc["error"]
    allowed = render_snapshot(state(*IRIS), {}, default_render_options(xds_dir="/tmp/x", allow_repository_control=True))
    assert route_for(allowed, "/v2/repository/models/iris/unload")["name"] == "rest/iris/repository"
    assert body(route_for(allowed, "/v2/repository/models/resnet/load"))[0] == 404


def test_grpc_routes_come_first_and_take_grpc_requests_only() -> None:
    for models in ((), IRIS, (*IRIS, instance("mlp", 1, "m", 7031))):
        snapshot = render_snapshot(state(*models), {}, OPTIONS)
        names = [r["name"] for r in routes(snapshot)]
        first_rest = next(i for i, name in enumerate(names) if name.startswith("rest/"))
        assert all(name.startswith("rest/") for name in names[first_rest:])
        assert names[-1] == "rest/unknown-endpoint"
        for route in routes(snapshot)[:first_rest]:
            # The repository control refusals take any request on their gRPC paths.
            assert "grpc" in route["match"] or route["name"].startswith("repository-control/"), route["name"]
        # Every gRPC request is taken before the REST routes, whatever its path and headers.
        for path in ("/inference.GRPCInferenceService/ModelInfer", "/v2/models/iris/infer", "/foo"):
            for headers in ({}, {"x-model-name": "iris"}, {"x-model-name": "iris", "x-model-version": "x"}):
                grpc = {"content-type": "application/grpc", **headers}
                assert not route_for(snapshot, path, headers=grpc)["name"].startswith("rest/")
        # A REST request carrying the model header still gets the REST route.
        if models:
            assert route_for(snapshot, "/v2/models/iris/infer",
                             headers={"x-model-name": "iris"})["name"].startswith("rest/iris/")


def test_a_request_that_is_neither_grpc_nor_kserve_rest_is_a_json_404() -> None:
    for models in ((), IRIS, (*IRIS, instance("mlp", 1, "m", 7031))):
        snapshot = render_snapshot(state(*models), {}, OPTIONS)
        for method, path in (("POST", "/foo"), ("GET", "/"), ("GET", "/v2/nothing"), ("POST", "/v2"),
                             ("POST", "/inference.GRPCInferenceService/ModelInfer")):
            route = route_for(snapshot, path, method)
            assert route["name"] == "rest/unknown-endpoint", (method, path, route["name"])
            assert body(route) == (404, {"error": "no KServe v2 endpoint at this path and method"})


def test_rate_limits_apply_to_rest_routes() -> None:
    options = default_render_options(xds_dir="/tmp/x", rate_limits={"iris": 5})
    snapshot = render_snapshot(state(*IRIS), {}, options)
    limited = route_for(snapshot, "/v2/models/iris/infer")["typed_per_filter_config"]
    assert limited["envoy.filters.http.local_ratelimit"]["token_bucket"]["max_tokens"] == 5


def test_status_documents_do_not_change_with_rest() -> None:
    with_rest = render_snapshot(state(*IRIS), {}, OPTIONS)
    without = render_snapshot(state(*(instance("iris", v, i, p, rest=False)
                                      for v, i, p in ((1, "a", 7001), (1, "b", 7011), (2, "c", 7021)))), {}, OPTIONS)
    docs = {name: doc.model_dump(exclude={"envoy_config_version", "published_at"})
            for name, doc in status_documents(with_rest, with_rest, None).items()}
    plain = {name: doc.model_dump(exclude={"envoy_config_version", "published_at"})
             for name, doc in status_documents(without, without, None).items()}
    assert docs == plain and docs["iris"]["effective_weights"] == {2: 100}


async def test_envoy_accepts_the_rest_snapshot(tmp_path: Path) -> None:
    options = default_render_options(xds_dir=str(tmp_path), listen_host="127.0.0.1", rate_limits={"iris": 5},
                                     allow_repository_control=True)
    snapshot = render_snapshot(state(*IRIS, routing("iris", {"1": 80, "2": 20}, sticky="x-user")), {}, options)
    await validate_snapshot(find_envoy(), snapshot)
    await validate_snapshot(find_envoy(), render_snapshot(state(*IRIS), {}, OPTIONS))
