"""Failures never break the gateway: Envoy rejecting a snapshot, Envoy crashing, an instance dying.

Envoy's rejection is real: the ``rejecting_gateway`` of tests/gateway/conftest.py runs the real
binary through a wrapper that adds an unknown field to the config it is asked to validate while a
marker file exists, and the real ``envoy --mode validate`` refuses it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.state import set_weights
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle, start_gateway
from tests.fixtures.etcd import EtcdServer
from tests.gateway.conftest import Fleet, register, started_fleet
from tests.gateway.test_e2e_routing import read_status, wait_status
from tests.gateway.traffic import count_versions, eventually, infer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def gateway(rejecting_gateway: GatewayHandle) -> GatewayHandle:
    """This module's gateway runs Envoy through the rejecting wrapper (tests/gateway/conftest.py)."""
    return rejecting_gateway


@pytest.fixture(scope="module")
def fleet(iris_repos: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A fleet of this module's own: :func:`test_killed_instance_costs_no_request` kills a member."""
    yield from started_fleet(iris_repos, tmp_path_factory.mktemp("fleet-failures"))


HEADER = [("x-model-name", "iris")]


async def test_envoy_validation_failure_keeps_the_last_good_snapshot(
        gateway: GatewayHandle, shared_etcd: EtcdServer, fleet: Fleet, *, marker: Path, client: EtcdClient,
        schema: KeySchema) -> None:
    register(shared_etcd, schema, fleet.v1[0], 1, "v1-a")
    await set_weights(client, schema, "iris", {1: 100})
    good = await wait_status(client, schema, lambda s: s.effective_weights == {1: 100}, "v1 live")

    await asyncio.to_thread(marker.touch)
    try:
        # A new version changes the snapshot's shape, so Envoy validates it, and rejects it.
        register(shared_etcd, schema, fleet.v2[0], 2, "v2-a")
        await set_weights(client, schema, "iris", {1: 50, 2: 50})
        status = await wait_status(client, schema, lambda s: any("Envoy rejected" in e for e in s.errors),
                                   "status error naming Envoy's rejection")
        assert any("no_such_field" in e for e in status.errors), status.errors
        assert status.effective_weights == {1: 100}
        assert status.envoy_config_version == good.envoy_config_version == gateway.routes_version()
        assert await count_versions(gateway.address, 100, HEADER) == {"1": 100}
    finally:
        await asyncio.to_thread(marker.unlink)
    # The next change is validated again (a new shape) and goes through.
    register(shared_etcd, schema, fleet.v1[1], 1, "v1-b")
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 50, 2: 50} and not s.errors, "recovered")
    assert set(await count_versions(gateway.address, 200, HEADER)) == {"1", "2"}


async def test_envoy_crash_is_restarted_by_the_gateway(gateway: GatewayHandle, client: EtcdClient,
                                                       schema: KeySchema) -> None:
    pgrep = await asyncio.create_subprocess_exec("pgrep", "-P", str(gateway.process.pid),
                                                 stdout=asyncio.subprocess.PIPE)
    output, _ = await pgrep.communicate()
    envoy_pids = [int(p) for p in output.split()]
    assert envoy_pids, "the gateway runs Envoy as its child"
    for pid in envoy_pids:
        os.kill(pid, signal.SIGKILL)

    async def serving() -> bool:
        try:
            return bool(await count_versions(gateway.address, 5, HEADER, concurrency=1))
        except grpc.aio.AioRpcError:
            return False

    await eventually(serving, 20.0, "traffic through a restarted Envoy")
    assert gateway.process.alive()
    assert "sluice_gateway_envoy_restarts_total 1.0" in gateway.metrics_text()
    status = await read_status(client, schema)
    assert status is not None and status.envoy_config_version == gateway.routes_version()


async def _load(address: str, stop: asyncio.Event, failures: list[str], clients: int = 8) -> int:
    """``clients`` callers through the gateway until ``stop``; returns how many calls succeeded."""
    done = 0

    async def one_client() -> None:
        nonlocal done
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    await infer(stub, HEADER)
                    done += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return done


async def test_sighup_hot_restarts_envoy_without_a_failed_request(gateway: GatewayHandle) -> None:
    """SIGHUP to the gateway: a new Envoy epoch takes over the listener, the old one drains."""
    def epoch() -> int:
        try:
            return int(json.loads(gateway.admin_get("/server_info"))["command_line_options"]["restart_epoch"])
        except OSError:
            return -1

    before = await asyncio.to_thread(epoch)
    failures: list[str] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(gateway.address, stop, failures))
    try:
        await asyncio.sleep(1.0)
        os.kill(gateway.process.pid, signal.SIGHUP)  # the controller only, not its process group

        async def new_epoch() -> bool:
            return await asyncio.to_thread(epoch) == before + 1

        await eventually(new_epoch, 20.0, "the next Envoy epoch serving")
        await asyncio.sleep(2.0)  # the old epoch drains meanwhile (--drain-time-s 5)
    finally:
        stop.set()
        done = await load
    assert done > 100
    assert failures == [], failures[:5]
    assert "sluice_gateway_envoy_hot_restarts_total 1.0" in gateway.metrics_text()
    assert "sluice_gateway_envoy_restarts_total 1.0" in gateway.metrics_text()  # only the crash of the test above


async def test_killed_instance_costs_no_request(gateway: GatewayHandle, fleet: Fleet, client: EtcdClient,
                                                schema: KeySchema) -> None:
    """Two v1 instances under load; one is SIGKILLed: Envoy retries on the other, nothing fails."""
    await set_weights(client, schema, "iris", {1: 100})
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 100}, "v1 only")
    failures: list[str] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(gateway.address, stop, failures))
    try:
        await asyncio.sleep(1.0)
        fleet.v1[1].process.signal(signal.SIGKILL)
        await asyncio.sleep(4.0)  # health checks and outlier detection take the dead host out meanwhile
    finally:
        stop.set()
        done = await load
    assert done > 100
    assert failures == [], failures[:5]


async def test_restarted_gateway_keeps_the_routing_in_force_while_the_document_is_invalid(
        gateway: GatewayHandle, shared_etcd: EtcdServer, gateway_prefix: str, fleet: Fleet, *, client: EtcdClient,
        schema: KeySchema, tmp_path: Path) -> None:
    """The last good routing survives a gateway restart (it is kept in the model's status), so an
    invalid document met at start-up does not send every request to the newest version. Runs last:
    it stops this module's gateway."""
    register(shared_etcd, schema, fleet.v1[0], 1, "v1-a")
    register(shared_etcd, schema, fleet.v2[0], 2, "v2-a")
    await set_weights(client, schema, "iris", {1: 90, 2: 10})
    status = await wait_status(client, schema, lambda s: s.effective_weights == {1: 90, 2: 10} and not s.errors,
                               "90/10 live")
    assert status.routing is not None and status.routing.weights == {1: 90, 2: 10}

    await asyncio.to_thread(gateway.stop)
    shared_etcd.etcdctl("put", schema.routing("iris"), '{"weights": {"1": 0, "2": 0}}')
    restarted = await asyncio.to_thread(start_gateway, shared_etcd, gateway_prefix, tmp_path / "restarted")
    try:
        status = await wait_status(client, schema, lambda s: any("last good routing stays in force" in e
                                                                  for e in s.errors), "restarted with last good")
        assert status.effective_weights == {1: 90, 2: 10}
        counts = await count_versions(restarted.address, 300, HEADER)
        assert counts["1"] > 200 and counts["2"] > 0, counts  # not all to version 2, the newest
        assert "last_good_routing_from_status" in restarted.process.log_text()
    finally:
        await asyncio.to_thread(restarted.stop)
        await set_weights(client, schema, "iris", {1: 100})  # the CLI's compare-and-swap replaces the bad one
