"""``sluice weights … --wait`` against a gateway whose publish fails for real: it ends at once with
the reason when the failed snapshot carried the written revision, and keeps waiting when only an
older revision failed.

Envoy's rejection is real (the wrapper of ``test_e2e_failures``: while a marker file exists, the
real ``envoy --mode validate`` is given a config with an unknown field). The gateway validates
each snapshot *shape* once, so every step below changes the shape (a version, a sticky header,
the deletion) to reach Envoy again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.registry.keys import KeySchema
from mesh.registry.records import StatusDocument
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.gateway.conftest import Fleet, register
from tests.gateway.test_e2e_failures import rejecting_gateway
from tests.mesh.registry.test_command import sluice

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

WAIT_S = "90"
"""Far beyond what a publish takes: a wait that ends says why, never that it timed out."""


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("marker") / "reject"


@pytest.fixture(scope="module")
def gateway(shared_etcd: EtcdServer, gateway_prefix: str, marker: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from rejecting_gateway(shared_etcd, gateway_prefix, tmp_path_factory.mktemp("gateway-wait-failures"),
                                 marker)


def status(etcd: EtcdServer, schema: KeySchema) -> StatusDocument | None:
    value = etcd.etcdctl("get", "--print-value-only", schema.status("iris")).stdout.strip()
    return StatusDocument.from_json(value) if value else None


def routing_revision(flags: list[str]) -> int:
    revision: int = json.loads(sluice("weights", "get", "iris", "-o", "json", *flags).stdout)["revision"]
    return revision


def test_wait_ends_at_once_when_the_written_revision_fails_to_publish(
        gateway: GatewayHandle, shared_etcd: EtcdServer, fleet: Fleet, schema: KeySchema, *, gateway_prefix: str,
        marker: Path) -> None:
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
