"""``sluice weights … --wait`` against a gateway whose publish fails for real: it ends at once with
the reason when the failed snapshot carried the written revision, and keeps waiting when only an
older revision failed.

Envoy's rejection is real (the ``rejecting_gateway`` of tests/gateway/conftest.py: while a marker
file exists, the real ``envoy --mode validate`` is given a config with an unknown field). The
gateway validates each snapshot *shape* once, so every step below changes the shape (a version, a
sticky header, the deletion) to reach Envoy again. A write that renders what Envoy serves already
publishes nothing and is in force all the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.registry.keys import KeySchema
from mesh.registry.records import RoutingDocument, StatusDocument
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.gateway.conftest import Fleet, register
from tests.mesh.registry.test_command import sluice

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "lily"
"""The model of the identical-render test (its own, so the other test's iris leaves it alone)."""
WAIT_S = "90"
"""Far beyond what a publish takes: a wait that ends says why, never that it timed out."""


def status(etcd: EtcdServer, schema: KeySchema, model: str = "iris") -> StatusDocument | None:
    value = etcd.etcdctl("get", "--print-value-only", schema.status(model)).stdout.strip()
    return StatusDocument.from_json(value) if value else None


def routing_revision(flags: list[str], model: str = "iris") -> int:
    revision: int = json.loads(sluice("weights", "get", model, "-o", "json", *flags).stdout)["revision"]
    return revision


def test_wait_ends_at_once_when_the_written_revision_fails_to_publish(
        rejecting_gateway: GatewayHandle, shared_etcd: EtcdServer, fleet: Fleet, schema: KeySchema, *,
        gateway_prefix: str, marker: Path) -> None:
    flags = ["--etcd", shared_etcd.endpoint, "--prefix", gateway_prefix]
    register(shared_etcd, schema, fleet.v1[0], 1, "v1-a")
    register(shared_etcd, schema, fleet.v2[0], 2, "v2-a")
    first = sluice("weights", "set", "iris", "1=100", "--wait", WAIT_S, *flags, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    good = routing_revision(flags)

    marker.touch()
    try:
        # A second instance is a new shape: Envoy rejects it. The failed snapshot carried revision
        # `good`, which stays in force.
        register(shared_etcd, schema, fleet.v1[1], 1, "v1-b")
        wait_for(lambda: (s := status(shared_etcd, schema)) is not None and s.failed_routing_revision == good,
                 60, "the status naming the failed snapshot's routing revision")
        before = status(shared_etcd, schema)
        assert before is not None and before.routing_revision == good and before.effective_weights == {1: 100}
        assert any("no_such_field" in error for error in before.errors), before.errors

        failed = sluice("weights", "set", "iris", "1=50", "2=50", "--wait", WAIT_S, *flags, timeout=120)
        written = routing_revision(flags)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert f"the gateway failed to publish routing revision {written} of 'iris'" in failed.stderr
        assert "no_such_field" in failed.stderr and "effective weights 1=100" in failed.stderr
        assert "has not applied" not in failed.stderr  # it said why, it did not time out
        after = status(shared_etcd, schema)
        assert after is not None and after.failed_routing_revision == written and after.routing_revision == good
    finally:
        marker.unlink()

    # Only revision `written` failed: the wait for the next write (a sticky header, a new shape that
    # Envoy now accepts) starts while the status still names that failure, and sees it applied.
    still_failed = status(shared_etcd, schema)
    assert still_failed is not None and still_failed.failed_routing_revision == written
    applied = sluice("weights", "set", "iris", "1=50", "2=50", "--sticky-header", "x-user", "--wait", WAIT_S,
                     *flags, timeout=120)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "iris: applied by the gateway within" in applied.stdout and "effective weights 1=50 2=50" in applied.stdout
    recovered = status(shared_etcd, schema)
    assert recovered is not None and recovered.failed_routing_revision is None and not recovered.errors

    # A deletion whose snapshot fails ends its wait too.
    marker.touch()
    try:
        deleted = sluice("weights", "delete", "iris", "--wait", WAIT_S, *flags, timeout=120)
        assert deleted.returncode == 1, deleted.stdout + deleted.stderr
        assert "the gateway failed to publish the deletion of its routing document of 'iris'" in deleted.stderr
        assert "no_such_field" in deleted.stderr
    finally:
        marker.unlink()


def test_a_write_that_renders_what_is_live_is_live_and_a_later_refusal_names_its_own_revision(
        rejecting_gateway: GatewayHandle, shared_etcd: EtcdServer, fleet: Fleet, schema: KeySchema, *,
        gateway_prefix: str, marker: Path) -> None:
    """A routing write that renders exactly the config Envoy serves publishes nothing, yet it is in
    force: ``--wait`` ends at once, and a later refused publish leaves the status naming it (not the
    plan before it, revision 0) as the routing in force and the refused write as the one that failed.
    A model of its own (registered at an iris service: only the configs matter here)."""
    flags = ["--etcd", shared_etcd.endpoint, "--prefix", gateway_prefix]
    register(shared_etcd, schema, fleet.v1[0], 1, "lily-v1-a", model=MODEL)
    wait_for(lambda: (s := status(shared_etcd, schema, MODEL)) is not None and s.effective_weights == {1: 100},
             60, f"{MODEL} routed without a routing document")
    before = status(shared_etcd, schema, MODEL)
    assert before is not None and (before.routing_revision, before.routing_source) == (0, "none")

    # All traffic to version 1 is what no document rendered (the newest serving version takes all).
    same = sluice("weights", "set", MODEL, "1=100", "--wait", WAIT_S, *flags, timeout=120)
    assert same.returncode == 0, same.stdout + same.stderr
    assert f"{MODEL}: applied by the gateway within" in same.stdout
    written = routing_revision(flags, MODEL)
    now = status(shared_etcd, schema, MODEL)
    assert now is not None and now.envoy_config_version == before.envoy_config_version  # nothing published
    assert (now.routing_revision, now.routing_source) == (written, "document")

    marker.touch()
    try:
        # A sticky header is a new shape: Envoy validates it, and refuses it.
        refused = sluice("weights", "set", MODEL, "1=100", "--sticky-header", "x-user", "--wait", WAIT_S, *flags,
                         timeout=120)
        refused_revision = routing_revision(flags, MODEL)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"the gateway failed to publish routing revision {refused_revision} of {MODEL!r}" in refused.stderr
        assert "no_such_field" in refused.stderr and "has not applied" not in refused.stderr
        after = status(shared_etcd, schema, MODEL)
        assert after is not None and after.failed_routing_revision == refused_revision
        assert after.envoy_config_version == before.envoy_config_version
        # The routing in force is the write that published nothing, not the plan from before it.
        assert (after.routing_revision, after.routing_source) == (written, "document")
        assert after.routing == RoutingDocument.from_weights({1: 100}) and after.effective_weights == {1: 100}
    finally:
        marker.unlink()
