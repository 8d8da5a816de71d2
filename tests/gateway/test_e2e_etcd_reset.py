"""etcd loses its data (SIGKILL, data dir wiped, restarted on the same port) under a running gateway.

Real etcd, the real ``sluice gateway`` running the real Envoy, real ``sluice serve`` processes that
register themselves through their registrar. The new etcd starts again at revision 1, below the
revision the gateway's watch had reached: the gateway must notice, list again and route what is
registered afterwards, and keep routing what it routed meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.settings import EtcdSettings
from tests.fixtures.envoy import start_gateway
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import ManagedProcess
from tests.fixtures.service import ServiceHandle, sluice_argv
from tests.gateway.conftest import SERVICE_START_TIMEOUT_S
from tests.gateway.traffic import count_versions, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

PREFIX = "/sluice-reset/"
ROUTABLE_TIMEOUT_S = 30.0
GRACE_S = 3.0


def _service(process_factory: Callable[..., ManagedProcess], etcd: EtcdServer, repo: Path) -> ServiceHandle:
    port, metrics_port = free_port(), free_port()
    argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port", str(metrics_port),
                       "--rest-port", "-1", "--log-format", "json", "--etcd", etcd.endpoint, "--prefix", PREFIX,
                       "--lease-ttl", "4",
                       "--grace-period", "1", "--deregister-grace", "0.2")
    return ServiceHandle(process_factory("sluice-serve", argv), port, metrics_port, repo)


async def _answers(address: str, metadata: tuple[tuple[str, str], ...], version: str) -> bool:
    try:
        return await count_versions(address, 4, metadata, concurrency=2) == {version: 4}
    except grpc.aio.AioRpcError:
        return False


async def test_gateway_follows_an_etcd_that_lost_its_data(
        etcd: EtcdServer, iris_repos: dict[int, Path], tmp_path: Path,
        process_factory: Callable[..., ManagedProcess]) -> None:
    gateway = start_gateway(etcd, PREFIX, tmp_path / "gateway", "--registry-reset-grace", str(GRACE_S))
    try:
        v1 = _service(process_factory, etcd, iris_repos[1])
        v1.process.wait_until(v1.ready, SERVICE_START_TIMEOUT_S, "ServerReady")
        model = (("x-model-name", "iris"),)
        await eventually(lambda: _answers(gateway.address, model, "1"), ROUTABLE_TIMEOUT_S, "v1 routable")

        # Push the old cluster's revision well above anything the new one reaches in this test.
        async with EtcdClient(EtcdSettings(endpoints=[etcd.endpoint])) as client:
            for index in range(40):
                await client.put(f"/filler/{index}", b"x")

        etcd.wipe_and_restart()
        # Envoy still has the last good snapshot: nothing the gateway does meanwhile may take it away.
        assert await count_versions(gateway.address, 20, model, concurrency=4) == {"1": 20}

        v2 = _service(process_factory, etcd, iris_repos[2])
        v2.process.wait_until(v2.ready, SERVICE_START_TIMEOUT_S, "ServerReady")
        pinned = (("x-model-name", "iris"), ("x-model-version", "2"))
        await eventually(lambda: _answers(gateway.address, pinned, "2"), ROUTABLE_TIMEOUT_S,
                         "version 2, registered after the wipe, routable through the gateway")
        # v1 registered itself again under a new lease: still routed once the grace is over.
        await asyncio.sleep(GRACE_S + 0.5)
        pinned_v1 = (("x-model-name", "iris"), ("x-model-version", "1"))
        await eventually(lambda: _answers(gateway.address, pinned_v1, "1"), ROUTABLE_TIMEOUT_S, "v1 still routable")
        assert "registry_reset" in gateway.process.log_text()
    finally:
        gateway.stop()
