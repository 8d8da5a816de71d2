"""What an operator sees through the real gateway: ``weights … --wait`` outcomes, the version header
rule, and the example client's exit codes.

Real etcd, the real ``sluice gateway`` with Envoy, three real ``sluice serve`` processes (iris v1
twice, v2 once); the CLI and ``examples/client.py`` (gRPC, then REST) run as subprocesses. Tests run
in file order.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import grpc
import pytest

from mesh.ports import free_port
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, InstanceState
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.gateway.conftest import Fleet
from tests.gateway.traffic import grpc_error
from tests.mesh.registry.test_command import ROOT, sluice

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def flags(shared_etcd: EtcdServer, gateway_prefix: str) -> list[str]:
    return ["--etcd", shared_etcd.endpoint, "--prefix", gateway_prefix]


def test_wait_reports_what_the_gateway_serves(registered: GatewayHandle, flags: list[str]) -> None:
    applied = sluice("weights", "set", "iris", "1=100", "--wait", "15", *flags)
    assert applied.returncode == 0, applied.stderr
    assert "iris: applied by the gateway within " in applied.stdout and "effective weights 1=100" in applied.stdout

    # Version 9 has no instances: the route falls back to the newest version, which is not success.
    differs = sluice("weights", "set", "iris", "9=50", "--wait", "15", *flags)
    assert differs.returncode == 3, differs.stdout + differs.stderr
    assert "applied with differences" in differs.stderr
    assert "version 9 has weight 50 but no serving instances" in differs.stderr
    assert "effective weights 2=100" in differs.stderr
    revision = json.loads(sluice("weights", "get", "iris", "-o", "json", *flags).stdout)["revision"]
    status = json.loads(sluice("status", "iris", "-o", "json", *flags).stdout)["models"][0]["status"]
    assert status["routing"]["weights"] == {"9": 50} and status["routing_revision"] == revision
    assert status["effective_weights"] == {"2": 100}
    table = sluice("status", "iris", *flags).stdout
    assert "iris: warning: version 9 has weight 50 but no serving instances" in table

    deleted = sluice("weights", "delete", "iris", "--wait", "15", *flags)
    assert deleted.returncode == 0, deleted.stderr
    assert "effective weights 2=100" in deleted.stdout


@pytest.mark.parametrize("version", ["abc", "01", "+1", "1.0"])
async def test_a_version_header_that_is_no_version_is_invalid_argument(registered: GatewayHandle,
                                                                        version: str) -> None:
    for metadata in ([("x-model-name", "iris"), ("x-model-version", version)], [("x-model-version", version)]):
        error = await grpc_error(registered.address, metadata)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (metadata, error)
        assert "x-model-version must be a positive integer" in (error.details() or "")
    unknown = await grpc_error(registered.address, [("x-model-name", "iris"), ("x-model-version", "9")])
    assert unknown.code() == grpc.StatusCode.NOT_FOUND


def client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "examples/client.py", "--timeout", "5", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


@pytest.mark.parametrize(("args", "code", "message"), [
    pytest.param([], 0, "response from 'iris' version 2", id="ok"),
    pytest.param(["--version", "1"], 0, "response from 'iris' version 1", id="pinned"),
    pytest.param(["--model", "nope"], 3, "not served here", id="unknown-model"),
    pytest.param(["--version", "9"], 3, "no serving instances of the version", id="unknown-version"),
    pytest.param(["--version", "abc"], 3, "x-model-version must be", id="invalid-version"),
])
def test_example_client_exit_codes_through_the_gateway(registered: GatewayHandle, args: list[str], code: int,
                                                        message: str) -> None:
    result = client("--url", registered.address, *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert "unreachable" not in result.stderr


def test_example_client_says_unreachable_only_when_nothing_answers() -> None:
    result = client("--url", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "is unreachable" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def rest_registered(registered: GatewayHandle, shared_etcd: EtcdServer, schema: KeySchema,
                    fleet: Fleet) -> GatewayHandle:
    """The same fleet with the ``rest_address`` a registrar writes: the gateway routes REST too."""
    for service, version, instance_id in ((fleet.v1[0], 1, "v1-a"), (fleet.v1[1], 1, "v1-b"),
                                          (fleet.v2[0], 2, "v2-a")):
        doc = InstanceRecord(address=service.address, rest_address=f"127.0.0.1:{service.rest_port}", model="iris",
                             version=version, instance_id=instance_id, state=InstanceState.SERVING)
        shared_etcd.etcdctl("put", schema.instance("iris", version, instance_id), doc.to_json().decode())
    host, _, port = registered.address.rpartition(":")
    deadline = time.monotonic() + 20
    pending = {1, 2}
    while pending and time.monotonic() < deadline:
        for version in sorted(pending):
            connection = http.client.HTTPConnection(host, int(port), timeout=5)
            try:
                connection.request("GET", f"/v2/models/iris/versions/{version}/ready")
                if connection.getresponse().status == 200:
                    pending.discard(version)
            except (OSError, http.client.HTTPException):
                pass
            finally:
                connection.close()
        time.sleep(0.1)
    assert not pending, f"iris versions {pending} not answering REST through the gateway within 20 s"
    return registered


@pytest.mark.parametrize(("args", "code", "message"), [
    pytest.param([], 0, "response from 'iris' version 2", id="ok"),
    pytest.param(["--version", "1"], 0, "response from 'iris' version 1", id="pinned"),
    pytest.param(["--model", "nope"], 3, "not served here", id="unknown-model"),
    pytest.param(["--version", "9"], 3, "no serving instances of this version", id="unknown-version"),
    pytest.param(["--version", "abc"], 3, "must be a positive integer", id="invalid-version"),
])
def test_example_client_over_rest_through_the_gateway(rest_registered: GatewayHandle, args: list[str], code: int,
                                                       message: str) -> None:
    result = client("--protocol", "rest", "--url", rest_registered.address, *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert "unreachable" not in result.stderr
    if code == 0:
        assert "live, ready (REST)" in result.stdout and "label" in result.stdout


def test_example_client_over_rest_says_unreachable_only_when_nothing_answers() -> None:
    result = client("--protocol", "rest", "--url", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2 and "is unreachable" in result.stderr, result.stderr
