"""Envoy's client certificate towards mTLS services renewed without a restart: real etcd, a real
``sluice serve`` that requires a client certificate, a real gateway whose --upstream-tls-cert/key
files are renewed while clients call all along (0 failed requests), Envoy then using the new one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mesh.devstack.pki import DevPki
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.gateway.certs import copied_pair, issue_pair
from tests.gateway.conftest import gateway_serving
from tests.gateway.traffic import CallsAllAlong, grpc_caller

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

TIMEOUT_S = 30.0
PREFIX = "/sluice-gw-upstream-rotation/"


@pytest.fixture(scope="module")
def client_pair(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return copied_pair(pki.gateway_client, tmp_path_factory.mktemp("gateway-client"), "client.crt", "client.key")


@pytest.fixture(scope="module")
def gateway(shared_etcd: EtcdServer, pki: DevPki, secure_service: ServiceHandle, client_pair: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, PREFIX, tmp_path_factory.mktemp("gw"), secure_service,
                               "--upstream-tls-ca", str(pki.ca.cert), "--upstream-tls-cert", str(client_pair[0]),
                               "--upstream-tls-key", str(client_pair[1]), "--upstream-tls-san", "localhost",
                               instance_id="mtls-1")


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([5.1, 3.5, 1.4, 0.2])
    return request


def _client_serials(gateway: GatewayHandle) -> set[int]:
    """Serials of the certificate chains Envoy holds (its /certs admin page)."""
    serials = set()
    for context in json.loads(gateway.admin_get("/certs")).get("certificates", []):
        for chain in context.get("cert_chain", []):
            serials.add(int(chain["serial_number"], 16))
    return serials


def test_a_renewed_upstream_client_certificate_is_used_without_a_failure(
        gateway: GatewayHandle, pki: DevPki, client_pair: tuple[Path, Path]) -> None:
    def answered() -> bool:
        try:
            with grpc.insecure_channel(gateway.address) as channel:
                return bool(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=5).model_name)
        except grpc.RpcError:
            return False

    wait_for(answered, TIMEOUT_S, "iris answering through the gateway over mTLS")
    client = grpc_caller(lambda: grpc.insecure_channel(gateway.address), _request)
    with CallsAllAlong(client, client) as calls:
        calls.wait_all_answered(TIMEOUT_S, "both clients answered")
        serial = issue_pair(pki, *client_pair)
        wait_for(lambda: serial in _client_serials(gateway), TIMEOUT_S, "Envoy holding the renewed certificate")
        calls.wait_all_answered(TIMEOUT_S, "both clients answered after the renewal")
    assert calls.failures == [], calls.failures[:5]
