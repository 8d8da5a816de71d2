"""mesh.istio.plan: routing model → VirtualService weights, the guarded JSON patch, the sync decision (pure)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh.istio.plan import (
    ANNOTATION_HELD,
    ANNOTATION_REVISION,
    ANNOTATION_WEIGHTS,
    Action,
    IstioError,
    apply_json_patch,
    build_patch,
    decode_weights,
    encode_weights,
    mesh_weights,
    percentages,
    plan_sync,
    read_weighted_route,
)
from mesh.registry.records import InstanceRecord, RoutingDocument
from mesh.registry.state import ModelState


def virtual_service(weights: dict[int, int], *, applied: dict[int, int] | None = None, revision: int = 0,
                    held: int | None = None, resource_version: str = "7") -> dict[str, Any]:
    """The shape the chart renders (charts/sluice/templates/istio.yaml)."""
    host = "demo-sluice-iris.models.svc.cluster.local"
    annotations = {ANNOTATION_WEIGHTS: encode_weights(weights if applied is None else applied),
                   ANNOTATION_REVISION: str(revision)}
    if held is not None:
        annotations[ANNOTATION_HELD] = str(held)
    pins = [{"name": f"pin-v{v}", "match": [{"headers": {"x-model-name": {"exact": "iris"},
                                                        "x-model-version": {"exact": str(v)}}}],
             "route": [{"destination": {"host": host, "subset": f"v{v}", "port": {"number": 8001}}}]}
            for v in sorted(weights)]
    weighted = {"name": "weighted", "match": [{"headers": {"x-model-name": {"exact": "iris"}}}],
                "route": [{"destination": {"host": host, "subset": f"v{v}", "port": {"number": 8001}}, "weight": w}
                          for v, w in sorted(weights.items())],
                "timeout": "60s"}
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "demo-sluice-iris", "namespace": "models", "resourceVersion": resource_version,
                         "annotations": annotations},
            "spec": {"hosts": [host], "http": [*pins, weighted]}}


def model(serving: list[int], routing: dict[int, int] | None = None, revision: int = 0,
          routing_error: str | None = None) -> ModelState:
    instances = {v: {"a": InstanceRecord(address="10.0.0.1:8001", model="iris", version=v, instance_id="a")}
                 for v in serving}
    document = RoutingDocument.from_weights(routing) if routing is not None else None
    return ModelState("iris", instances=instances, routing=document, routing_error=routing_error,
                      routing_revision=revision)


@pytest.mark.parametrize(("weights", "expected"), [
    ({1: 90, 2: 10}, {1: 90, 2: 10}),
    ({1: 3, 2: 1}, {1: 75, 2: 25}),
    ({1: 1, 2: 1, 3: 1}, {1: 33, 2: 33, 3: 34}),
    ({1: 999, 2: 1}, {1: 99, 2: 1}),
    ({1: 5, 2: 0}, {1: 100, 2: 0}),
    ({7: 1}, {7: 100}),
])
def test_percentages_sum_to_100_and_keep_every_positive_weight(weights: dict[int, int],
                                                               expected: dict[int, int]) -> None:
    assert percentages(weights) == expected
    assert sum(percentages(weights).values()) == 100


def test_percentages_reject_zero_total() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        percentages({1: 0})


def test_read_weighted_route() -> None:
    route = read_weighted_route(virtual_service({1: 90, 2: 10}))
    assert route.index == 2
    assert route.weights == {1: 90, 2: 10}


def test_read_weighted_route_explains_what_is_wrong() -> None:
    vs = virtual_service({1: 100})
    vs["spec"]["http"].pop()
    with pytest.raises(IstioError, match="no HTTP route named 'weighted'"):
        read_weighted_route(vs)
    vs = virtual_service({1: 100})
    vs["spec"]["http"][-1]["route"][0]["destination"]["subset"] = "stable"
    with pytest.raises(IstioError, match=r"'stable' .* is not v<version>"):
        read_weighted_route(vs)


def test_a_single_destination_without_weight_counts_as_100() -> None:
    vs = virtual_service({1: 100})
    del vs["spec"]["http"][-1]["route"][0]["weight"]
    assert read_weighted_route(vs).weights == {1: 100}


def test_mesh_weights_drop_versions_without_subset() -> None:
    fitted = mesh_weights({1: 50, 3: 50}, [1, 2])
    assert fitted.weights == {1: 100, 2: 0}
    assert fitted.warnings == ["version 3 has weight 50 but the VirtualService has no subset v3 (deploy it with "
                               "the chart)"]
    assert mesh_weights({3: 50}, [1, 2]).errors == ["no weighted version has a subset in the VirtualService"]


def test_annotation_weights_round_trip() -> None:
    assert encode_weights({2: 10, 1: 90}) == '{"1":90,"2":10}'
    assert decode_weights('{"1":90,"2":10}') == {1: 90, 2: 10}
    assert decode_weights("not json") is None
    assert decode_weights(None) is None


def test_patch_is_guarded_and_touches_only_weights_and_annotations() -> None:
    vs = virtual_service({1: 90, 2: 10})
    route = read_weighted_route(vs)
    patch = build_patch(vs, route, {1: 50, 2: 50}, {ANNOTATION_WEIGHTS: '{"1":50,"2":50}', ANNOTATION_HELD: None})
    assert patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "7"}
    assert patch[1]["op"] == "test" and patch[1]["path"] == "/spec/http/2/route"
    assert {"op": "add", "path": "/spec/http/2/route/0/weight", "value": 50} in patch
    assert {"op": "add", "path": "/metadata/annotations/sluice.io~1applied-weights",
            "value": '{"1":50,"2":50}'} in patch
    assert all(op["op"] != "remove" for op in patch)  # the held annotation was not there
    after = apply_json_patch(vs, patch)
    assert read_weighted_route(after).weights == {1: 50, 2: 50}
    assert after["spec"]["http"][:2] == vs["spec"]["http"][:2]
    assert after["spec"]["http"][2]["timeout"] == "60s"


def test_patch_fails_when_the_object_changed_in_between() -> None:
    vs = virtual_service({1: 90, 2: 10})
    patch = build_patch(vs, read_weighted_route(vs), {1: 50, 2: 50}, {})
    edited = copy.deepcopy(vs)
    edited["spec"]["http"][2]["route"][0]["weight"] = 80
    edited["spec"]["http"][2]["route"][1]["weight"] = 20
    with pytest.raises(IstioError, match="test failed: /metadata/resourceVersion"):
        apply_json_patch({**edited, "metadata": {**edited["metadata"], "resourceVersion": "8"}}, patch)
    with pytest.raises(IstioError, match="test failed: /spec/http/2/route"):
        apply_json_patch(edited, patch)  # even if the resourceVersion guard were absent


def test_patch_creates_missing_annotations() -> None:
    vs = virtual_service({1: 100})
    del vs["metadata"]["annotations"]
    patch = build_patch(vs, read_weighted_route(vs), None, {ANNOTATION_HELD: "4"})
    assert apply_json_patch(vs, patch)["metadata"]["annotations"] == {ANNOTATION_HELD: "4"}


def test_plan_applies_the_routing_document() -> None:
    plan = plan_sync(model([1, 2], {1: 3, 2: 1}, revision=12), virtual_service({1: 90, 2: 10}))
    assert plan.action is Action.PATCH
    assert plan.effective_weights == {1: 75, 2: 25}
    after = apply_json_patch(virtual_service({1: 90, 2: 10}), plan.patch)
    assert read_weighted_route(after).weights == {1: 75, 2: 25}
    annotations = after["metadata"]["annotations"]
    assert annotations[ANNOTATION_WEIGHTS] == '{"1":75,"2":25}'
    assert annotations[ANNOTATION_REVISION] == "12"
    # Applied: the next pass has nothing to do.
    assert plan_sync(model([1, 2], {1: 3, 2: 1}, revision=12), after).action is Action.NONE


def test_plan_without_routing_document_keeps_the_chart_weights() -> None:
    plan = plan_sync(model([1, 2]), virtual_service({1: 90, 2: 10}))
    assert plan.action is Action.NONE
    assert plan.effective_weights == {1: 90, 2: 10}
    assert "no routing document" in plan.warnings[0]


def test_plan_with_invalid_routing_document_keeps_the_last_weights() -> None:
    plan = plan_sync(model([1, 2], routing_error="invalid routing document: weights: required", revision=5),
                     virtual_service({1: 90, 2: 10}))
    assert plan.action is Action.NONE
    assert plan.effective_weights == {1: 90, 2: 10}
    assert "weights: required" in plan.errors[0]


def test_plan_drops_versions_without_serving_instances() -> None:
    plan = plan_sync(model([1], {1: 50, 2: 50}, revision=3), virtual_service({1: 50, 2: 50}))
    assert plan.action is Action.PATCH
    assert plan.effective_weights == {1: 100, 2: 0}
    assert plan.warnings == ["version 2 has weight 50 but no serving instances"]


def test_plan_without_any_serving_instance_changes_nothing() -> None:
    plan = plan_sync(model([], {1: 100}, revision=3), virtual_service({1: 90, 2: 10}))
    assert plan.action is Action.NONE
    assert "no serving instances" in plan.errors[0]


def test_plan_holds_weights_edited_outside_etcd() -> None:
    edited = virtual_service({1: 70, 2: 30}, applied={1: 90, 2: 10}, revision=12)
    state = model([1, 2], {1: 90, 2: 10}, revision=12)
    plan = plan_sync(state, edited)
    assert plan.action is Action.HOLD
    assert plan.effective_weights == {1: 70, 2: 30}
    assert "changed outside etcd" in plan.errors[0]
    held = apply_json_patch(edited, plan.patch)
    assert read_weighted_route(held).weights == {1: 70, 2: 30}  # not overwritten
    assert held["metadata"]["annotations"][ANNOTATION_HELD] == "12"
    # Still held on the next pass, and the report stays.
    again = plan_sync(state, held)
    assert again.action is Action.NONE and "changed outside etcd" in again.errors[0]
    # A routing document written after the hold takes over.
    newer = plan_sync(model([1, 2], {1: 50, 2: 50}, revision=20), held)
    assert newer.action is Action.PATCH
    taken = apply_json_patch(held, newer.patch)
    assert read_weighted_route(taken).weights == {1: 50, 2: 50}
    assert ANNOTATION_HELD not in taken["metadata"]["annotations"]


def test_plan_reports_a_virtual_service_it_cannot_use() -> None:
    vs = virtual_service({1: 100})
    vs["spec"]["http"] = []
    plan = plan_sync(model([1], {1: 100}, revision=2), vs)
    assert plan.action is Action.NONE and "no HTTP route named 'weighted'" in plan.errors[0]
