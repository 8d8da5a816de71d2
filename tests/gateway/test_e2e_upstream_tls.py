"""mTLS from the gateway's Envoy to the model services: real etcd, a real ``sluice serve`` that
requires a client certificate, and two real gateways: one with the gateway's client certificate
(calls over gRPC and REST succeed, health checks pass over TLS) and one without (the service
refuses Envoy's connections: no healthy upstream, nothing served)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import grpc
import pytest

from mesh.devstack.pki import DevPki
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.service import ServiceHandle
from tests.gateway.conftest import gateway_serving
from tests.gateway.traffic import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

ROUTABLE_TIMEOUT_S = 20.0
ROW = [[5.1, 3.5, 1.4, 0.2]]


@pytest.fixture(scope="module")
def mtls_gateway(shared_etcd: EtcdServer, pki: DevPki, secure_service: ServiceHandle,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, "/sluice-gw-upstream-mtls/", tmp_path_factory.mktemp("mtls"),
                               secure_service, "--upstream-tls-ca", str(pki.ca.cert), "--upstream-tls-cert",
                               str(pki.gateway_client.cert), "--upstream-tls-key", str(pki.gateway_client.key),
                               "--upstream-tls-san", "localhost", instance_id="tls-1")


@pytest.fixture(scope="module")
def certless_gateway(shared_etcd: EtcdServer, pki: DevPki, secure_service: ServiceHandle,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, "/sluice-gw-upstream-nocert/", tmp_path_factory.mktemp("nocert"),
                               secure_service, "--upstream-tls-ca", str(pki.ca.cert), instance_id="tls-1")


def _infer(address: str) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(ROW[0])
    with grpc.insecure_channel(address) as channel:
        response: pb.ModelInferResponse = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
        return response


def _rest_infer(address: str) -> tuple[int, dict[str, object]]:
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]})
        connection.request("POST", "/v2/models/iris/infer", body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


async def _wait_answering(gateway: GatewayHandle) -> None:
    async def answered() -> bool:
        try:
            return _infer(gateway.address).model_name == "iris"
        except grpc.RpcError:
            return False

    await eventually(answered, ROUTABLE_TIMEOUT_S, "iris answering through the gateway over mTLS")


async def test_the_gateway_with_its_client_certificate_reaches_the_mtls_service(mtls_gateway: GatewayHandle) -> None:
    await _wait_answering(mtls_gateway)
    status, doc = _rest_infer(mtls_gateway.address)
    assert status == 200 and doc["model_name"] == "iris", doc


async def test_a_gateway_without_a_client_certificate_is_refused_by_the_service(
        certless_gateway: GatewayHandle, mtls_gateway: GatewayHandle) -> None:
    # Once the gateway with the certificate answers, the service is up: the other one must not.
    await _wait_answering(mtls_gateway)

    async def routed() -> bool:  # the certless gateway routes iris (its hosts merely never get healthy)
        host, _, port = certless_gateway.address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            connection.request("POST", "/v2/repository/index", body=b"{}")
            return b'"iris"' in connection.getresponse().read()
        finally:
            connection.close()

    await eventually(routed, ROUTABLE_TIMEOUT_S, "iris routed by the gateway without a client certificate")
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            _infer(certless_gateway.address)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    status, _ = _rest_infer(certless_gateway.address)
    assert status == 503
