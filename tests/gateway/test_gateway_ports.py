"""A port ``sluice gateway`` cannot bind stops it with one line naming the flag, exit status 2.

A real gateway (with its real Envoy) holds its ports; a second real gateway is started beside it
with one of them the same.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.ports import free_port
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.service import sluice_argv
from tests.gateway.conftest import running_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]

EXIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def first(shared_etcd: EtcdServer, gateway_prefix: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from running_gateway(shared_etcd, gateway_prefix, tmp_path_factory.mktemp("gateway-first"))


@pytest.mark.parametrize(("flag", "what", "hint"), [
    ("--listen-port", "Envoy's gRPC listener", "--listen-port"),
    ("--admin-port", "Envoy's admin API", "--admin-port"),
    ("--metrics-port", "the gateway's metrics", "--metrics-port (-1 turns metrics off)"),
])
def test_taken_port_is_one_line_naming_the_flag(first: GatewayHandle, shared_etcd: EtcdServer, tmp_path: Path, *,
                                                flag: str, what: str, hint: str) -> None:
    ports = {"--listen-port": free_port(), "--admin-port": free_port(), "--metrics-port": free_port()}
    taken = {"--listen-port": first.listen_port, "--admin-port": first.admin_port,
             "--metrics-port": first.metrics_port}[flag]
    ports[flag] = taken
    argv = sluice_argv("gateway", "--etcd", shared_etcd.endpoint, "--prefix", first.prefix,
                       "--listen-host", "127.0.0.1", "--xds-dir", str(tmp_path / "xds"), "--log-format", "json",
                       *(part for item in ports.items() for part in (item[0], str(item[1]))))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"sluice gateway: cannot listen on 127.0.0.1:{taken} for {what}: Address already in use; "
        f"choose another port with {hint}"]
    assert first.ready()
