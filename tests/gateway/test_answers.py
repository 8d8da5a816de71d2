"""gateway/answers.py: the gateway's own view (ready, index) from rendered snapshots, and its routes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.answers import ANSWERED_PATHS, ANSWERS_CLUSTER, GatewayView, view_of
from gateway.envoy import find_envoy, validate_snapshot
from gateway.render import render_snapshot
from mesh.registry.records import InstanceState
from tests.gateway.test_render import IRIS, OPTIONS, instance, route_names, routing, state

WITH_ANSWERS = replace(OPTIONS, answers_address="127.0.0.1:7999")


def test_the_view_lists_what_the_gateway_routes_and_is_ready_only_with_a_weighted_version() -> None:
    assert view_of(None) == GatewayView((), False)
    assert view_of(render_snapshot(state(), {}, WITH_ANSWERS)) == GatewayView((), False)
    both = render_snapshot(state(*IRIS, instance("mlp", 3, "m", 7005)), {}, WITH_ANSWERS)
    assert view_of(both) == GatewayView((("iris", 1), ("iris", 2), ("mlp", 3)), True)
    # Draining instances only: nothing is routed, the gateway is not ready.
    draining = render_snapshot(state(instance("iris", 1, "a", 7001, state=InstanceState.DRAINING),
                                     routing("iris", {"weights": {"1": 100}})), {}, WITH_ANSWERS)
    assert view_of(draining).routable is False


def test_server_rpcs_without_header_go_to_the_answers_cluster_after_the_header_routes() -> None:
    snapshot = render_snapshot(state(*IRIS, instance("mlp", 1, "m", 7005)), {}, WITH_ANSWERS)
    names = route_names(snapshot)
    answered = [f"gateway/{path.rpartition('/')[2]}" for path in ANSWERED_PATHS]
    assert all(name in names for name in answered)
    # After every header route (a call with x-model-name still reaches that model), before the
    # route that asks for a header.
    assert names.index("unknown-model") < names.index(answered[0])
    assert names.index(answered[-1]) < names.index("missing-model-header")
    assert snapshot.clusters[ANSWERS_CLUSTER]["type"] == "EDS"
    assert "7999" in str(snapshot.endpoints[ANSWERS_CLUSTER])
    assert ANSWERS_CLUSTER not in render_snapshot(state(*IRIS), {}, OPTIONS).clusters


@pytest.mark.slow
async def test_real_envoy_accepts_the_answers_routes() -> None:
    await validate_snapshot(find_envoy(), render_snapshot(state(*IRIS), {}, WITH_ANSWERS))
