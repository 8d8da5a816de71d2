"""TLS on the gateway's listener: real etcd, a real ``sluice serve``, two real gateways (one TLS, one
mTLS). gRPC and REST over TLS succeed, plaintext to the TLS port fails, the mTLS listener refuses a
client without a certificate; a renewed certificate is served to new connections while clients
call all along (0 failed requests), and a broken renewal is refused with the old one kept."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from mesh.devstack.pki import DevPki
from mesh.ports import free_port
from mesh.registry.keys import KeySchema
from mesh.registry.records import StatusDocument
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import ManagedProcess, wait_for
from tests.fixtures.service import ServiceHandle, sluice_argv
from tests.gateway.certs import copied_pair, issue_pair
from tests.gateway.conftest import gateway_serving
from tests.gateway.traffic import CallsAllAlong, grpc_caller

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

ROUTABLE_TIMEOUT_S = 30.0
ROTATION_TIMEOUT_S = 20.0
ROW = [5.1, 3.5, 1.4, 0.2]
TLS_PREFIX = "/sluice-gw-listener-tls/"
MTLS_PREFIX = "/sluice-gw-listener-mtls/"


@pytest.fixture(scope="module")
def service(iris_repos: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    workdir = tmp_path_factory.mktemp("listener-tls-service")
    port, metrics_port, rest_port = free_port(), free_port(), free_port()
    argv = sluice_argv("serve", "--repo", str(iris_repos[1]), "--port", str(port), "--metrics-port",
                       str(metrics_port), "--rest-port", str(rest_port), "--log-format", "json")
    handle = ServiceHandle(ManagedProcess("iris-plain", argv, workdir / "iris.log"), port, metrics_port,
                           iris_repos[1], rest_port)
    try:
        handle.process.wait_until(handle.ready, 90, "ServerReady")
        yield handle
    finally:
        handle.process.stop()


@pytest.fixture(scope="module")
def certs(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Copies of the gateway's pair that the rotation test renews in place."""
    return copied_pair(pki.gateway, tmp_path_factory.mktemp("gateway-certs"), "tls.crt", "tls.key")


@pytest.fixture(scope="module")
def tls_gateway(shared_etcd: EtcdServer, certs: tuple[Path, Path], service: ServiceHandle,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, TLS_PREFIX, tmp_path_factory.mktemp("tls-gw"), service,
                               "--tls-cert", str(certs[0]), "--tls-key", str(certs[1]), instance_id="plain-1")


@pytest.fixture(scope="module")
def mtls_gateway(shared_etcd: EtcdServer, pki: DevPki, service: ServiceHandle,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, MTLS_PREFIX, tmp_path_factory.mktemp("mtls-gw"), service,
                               "--tls-cert", str(pki.gateway.cert), "--tls-key", str(pki.gateway.key),
                               "--tls-client-ca", str(pki.ca.cert), instance_id="plain-1")


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(ROW)
    return request


def _channel(address: str, pki: DevPki, *, client_cert: bool = False) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=pki.client.key.read_bytes() if client_cert else None,
        certificate_chain=pki.client.cert.read_bytes() if client_cert else None)
    return grpc.secure_channel(address.replace("127.0.0.1", "localhost"), credentials)


def _context(pki: DevPki, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client_cert:
        context.load_cert_chain(pki.client.cert, pki.client.key)
    return context


def _rest_infer(gateway: GatewayHandle, context: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    connection = http.client.HTTPSConnection("localhost", gateway.listen_port, timeout=5, context=context)
    try:
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [ROW]}]})
        connection.request("POST", "/v2/models/iris/infer", body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def _serial(gateway: GatewayHandle, pki: DevPki) -> int:
    """The serial of the certificate a new connection to the listener is shown."""
    context = _context(pki)
    with socket.create_connection(("127.0.0.1", gateway.listen_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def _wait_answering(gateway: GatewayHandle, pki: DevPki, *, client_cert: bool = False) -> None:
    def answered() -> bool:
        try:
            with _channel(gateway.address, pki, client_cert=client_cert) as channel:
                reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=5)
                return bool(reply.model_name == "iris")
        except grpc.RpcError:
            return False

    wait_for(answered, ROUTABLE_TIMEOUT_S, "iris answering through the TLS listener")


def test_grpc_and_rest_over_the_tls_listener(tls_gateway: GatewayHandle, pki: DevPki) -> None:
    _wait_answering(tls_gateway, pki)
    status, doc = _rest_infer(tls_gateway, _context(pki))
    assert status == 200 and doc["model_name"] == "iris", doc


def test_plaintext_to_the_tls_port_fails(tls_gateway: GatewayHandle, pki: DevPki) -> None:
    _wait_answering(tls_gateway, pki)
    with grpc.insecure_channel(tls_gateway.address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    connection = http.client.HTTPConnection("127.0.0.1", tls_gateway.listen_port, timeout=5)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            connection.request("POST", "/v2/models/iris/infer", body=b"{}")
            connection.getresponse()
    finally:
        connection.close()


def test_the_status_document_reports_the_auth_mode(tls_gateway: GatewayHandle, shared_etcd: EtcdServer,
                                                   pki: DevPki) -> None:
    _wait_answering(tls_gateway, pki)

    def reported() -> bool:
        raw = shared_etcd.etcdctl("get", "--print-value-only", KeySchema(TLS_PREFIX).status("iris")).stdout
        return bool(raw.strip()) and StatusDocument.from_json(raw.strip()).auth == {
            "tls": "tls", "upstream_tls": "off", "jwt": "off"}

    wait_for(reported, ROUTABLE_TIMEOUT_S, "the status document reporting tls")


def test_the_mtls_listener_wants_a_client_certificate(mtls_gateway: GatewayHandle, pki: DevPki) -> None:
    _wait_answering(mtls_gateway, pki, client_cert=True)
    status, doc = _rest_infer(mtls_gateway, _context(pki, client_cert=True))
    assert status == 200 and doc["model_name"] == "iris", doc
    with _channel(mtls_gateway.address, pki) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _rest_infer(mtls_gateway, _context(pki))


def test_a_renewed_certificate_is_served_under_load_without_a_failure(
        tls_gateway: GatewayHandle, pki: DevPki, certs: tuple[Path, Path]) -> None:
    _wait_answering(tls_gateway, pki)
    old_serial = _serial(tls_gateway, pki)

    def rest_client(calls: CallsAllAlong, slot: int) -> None:  # a new TLS handshake for every request
        context = _context(pki)
        while calls.running():
            try:
                status, doc = _rest_infer(tls_gateway, context)
                if status == 200:
                    calls.answered(slot)
                else:
                    calls.failed(f"rest: {status} {doc}")
            except (OSError, http.client.HTTPException) as exc:
                calls.failed(f"rest: {exc!r}")

    grpc_client = grpc_caller(lambda: _channel(tls_gateway.address, pki), _request)  # one long-lived connection
    with CallsAllAlong(grpc_client, grpc_client, rest_client, rest_client) as calls:
        calls.wait_all_answered(ROUTABLE_TIMEOUT_S, "every client answered once")
        new_serial = issue_pair(pki, *certs)
        wait_for(lambda: _serial(tls_gateway, pki) == new_serial, ROTATION_TIMEOUT_S,
                 "new connections shown the renewed certificate")
        calls.wait_all_answered(ROUTABLE_TIMEOUT_S, "every client answered after the renewal")
    assert new_serial != old_serial
    assert calls.failures == [], calls.failures[:5]
    # The controller confirmed Envoy's secret at the renewed version (config dump).
    wait_for(lambda: "tls_published" in tls_gateway.process.log_text(), ROTATION_TIMEOUT_S,
             "the renewal confirmed in the gateway's log")


def test_a_broken_renewal_is_refused_and_the_certificate_in_force_stays(
        tls_gateway: GatewayHandle, pki: DevPki, certs: tuple[Path, Path]) -> None:
    _wait_answering(tls_gateway, pki)
    serial = _serial(tls_gateway, pki)
    cert = certs[0]
    good = cert.read_bytes()
    tmp = cert.with_name(".broken")
    tmp.write_text("this is no certificate")
    os.replace(tmp, cert)
    try:
        wait_for(lambda: "tls_files_refused" in tls_gateway.process.log_text(), ROTATION_TIMEOUT_S,
                 "the broken certificate refused in the gateway's log")
        assert _serial(tls_gateway, pki) == serial
        status, _ = _rest_infer(tls_gateway, _context(pki))
        assert status == 200
    finally:
        tmp.write_bytes(good)
        os.replace(tmp, cert)
