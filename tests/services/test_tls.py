"""TLS and mTLS on the service's gRPC and REST ports, with the dev stack's throwaway CA
(mesh/devstack/pki.py): a real `sluice serve`, real handshakes."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from mesh.devstack.pki import DevPki, ensure_dev_pki
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.pki import client_context
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle, serve_refused
from tests.services.models import identity, write_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "echo", identity("FP32", [1, 4]))
    return root


def _credentials(pki: DevPki, *, client_cert: bool) -> grpc.ChannelCredentials:
    pair = (pki.gateway_client.key.read_bytes(), pki.gateway_client.cert.read_bytes()) if client_cert else (None, None)
    return grpc.ssl_channel_credentials(pki.ca.cert.read_bytes(), *pair)


def _ready(address: str, credentials: grpc.ChannelCredentials | None) -> bool | str:
    """ServerReady's answer, or the gRPC error's code name."""
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
    with channel:
        try:
            return bool(pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=3).ready)
        except grpc.RpcError as exc:
            return str(exc.code().name)


def _rest_live(port: int, context: ssl.SSLContext | None) -> int | str:
    connection = (http.client.HTTPConnection("127.0.0.1", port, timeout=5) if context is None
                  else http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context))
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        connection.close()


def _client_context(pki: DevPki, *, client_cert: bool) -> ssl.SSLContext:
    return client_context(pki.ca.cert, (pki.gateway_client.cert, pki.gateway_client.key) if client_cert else None)


def test_mtls_service_refuses_callers_without_a_certificate(start_service: Callable[..., ServiceHandle],
                                                           pki: DevPki, repo: Path) -> None:
    handle = start_service(repo, "--tls-cert", str(pki.service.cert), "--tls-key", str(pki.service.key),
                           "--tls-client-ca", str(pki.ca.cert), wait=False)
    with_cert = _credentials(pki, client_cert=True)
    wait_for(lambda: _ready(handle.address, with_cert) is True, 60, "ServerReady over mTLS")
    assert _ready(handle.address, None) == "UNAVAILABLE"  # plaintext to a TLS port
    assert _ready(handle.address, _credentials(pki, client_cert=False)) == "UNAVAILABLE"  # no certificate
    assert _rest_live(handle.rest_port, _client_context(pki, client_cert=True)) == 200
    assert _rest_live(handle.rest_port, _client_context(pki, client_cert=False)) != 200
    assert _rest_live(handle.rest_port, None) != 200
    assert handle.process.alive()


def test_tls_without_client_ca_serves_any_tls_caller(start_service: Callable[..., ServiceHandle],
                                                     pki: DevPki, repo: Path) -> None:
    handle = start_service(repo, "--tls-cert", str(pki.service.cert), "--tls-key", str(pki.service.key), wait=False)
    wait_for(lambda: _ready(handle.address, _credentials(pki, client_cert=False)) is True, 60, "ServerReady over TLS")
    assert _ready(handle.address, None) == "UNAVAILABLE"
    assert _rest_live(handle.rest_port, _client_context(pki, client_cert=False)) == 200


@pytest.mark.parametrize(("flags", "message"), [
    (("--tls-cert", "{service.cert}"), "--tls-cert and --tls-key go together"),
    (("--tls-client-ca", "{ca.cert}"), "--tls-client-ca needs --tls-cert"),
    (("--tls-cert", "{service.cert}", "--tls-key", "{client.key}"), "does not belong to --tls-cert"),
    (("--tls-cert", "{missing}", "--tls-key", "{service.key}"), "No such file"),
    (("--tls-cert", "{service.key}", "--tls-key", "{service.key}"), "not PEM"),
])
def test_unusable_tls_files_stop_the_start_with_one_line(pki: DevPki, repo: Path, tmp_path: Path,
                                                         flags: tuple[str, ...], message: str) -> None:
    paths = {"{service.cert}": pki.service.cert, "{service.key}": pki.service.key, "{client.key}": pki.client.key,
             "{ca.cert}": pki.ca.cert, "{missing}": tmp_path / "nope.crt"}
    stderr = serve_refused(repo, *(str(paths.get(flag, flag)) for flag in flags), metrics_port=-1)
    assert message in stderr, stderr


def _served_serial(port: int, pki: DevPki, alpn: str) -> int:
    """The serial number of the certificate the port presents to a new connection."""
    context = _client_context(pki, client_cert=True)
    context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _renewed_service_pair(pki: DevPki, side: Path) -> tuple[bytes, bytes]:
    """A new certificate and key for the service from the same CA (key and cert bytes)."""
    shutil.copytree(pki.directory, side)
    (side / pki.service.cert.name).unlink()
    renewed = ensure_dev_pki(side)
    return renewed.service.cert.read_bytes(), renewed.service.key.read_bytes()


def test_renewed_certificate_files_serve_new_connections_without_a_failed_call(
        start_service: Callable[..., ServiceHandle], repo: Path, tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    handle = start_service(repo, "--tls-cert", str(pki.service.cert), "--tls-key", str(pki.service.key),
                           "--tls-client-ca", str(pki.ca.cert), wait=False)
    credentials = _credentials(pki, client_cert=True)
    wait_for(lambda: _ready(handle.address, credentials) is True, 60, "ServerReady over mTLS")
    old = x509.load_pem_x509_certificate(pki.service.cert.read_bytes()).serial_number
    assert _served_serial(handle.port, pki, "h2") == old == _served_serial(handle.rest_port, pki, "http/1.1")

    stop = threading.Event()
    failures: list[str] = []
    calls = [0, 0]

    def grpc_calls() -> None:  # one long-lived connection, as Envoy keeps
        with grpc.secure_channel(handle.address, credentials,
                                 options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.ServerReady(pb.ServerReadyRequest(), timeout=5)
                    calls[0] += 1
                except grpc.RpcError as exc:
                    failures.append(f"gRPC: {exc.code()}")

    def rest_calls() -> None:  # a new connection (and handshake) per call
        context = _client_context(pki, client_cert=True)
        while not stop.is_set():
            status = _rest_live(handle.rest_port, context)
            if status == 200:
                calls[1] += 1
            else:
                failures.append(f"REST: {status}")

    threads = [threading.Thread(target=grpc_calls), threading.Thread(target=rest_calls)]
    for thread in threads:
        thread.start()
    try:
        # A renewal that cannot be used (not PEM) keeps the old certificate, and is logged once.
        original = pki.service.cert.read_bytes()
        broken = tmp_path / "broken.crt"
        broken.write_bytes(b"not a certificate\n")
        os.replace(broken, pki.service.cert)
        wait_for(lambda: "tls_reload_refused" in handle.process.log_text(), 20, "the refused renewal logged")
        time.sleep(2.5)  # a few more looks at the same files (the reload checks once a second)
        assert handle.process.log_text().count("tls_reload_refused") == 1
        assert _served_serial(handle.rest_port, pki, "http/1.1") == old
        assert _served_serial(handle.port, pki, "h2") == old

        # The real renewal: key, then certificate, each moved into place.
        cert, key = _renewed_service_pair(pki, tmp_path / "renewed")
        new = x509.load_pem_x509_certificate(cert).serial_number
        assert new != old and cert != original
        for data, target in ((key, pki.service.key), (cert, pki.service.cert)):
            staged = tmp_path / f"staged-{target.name}"
            staged.write_bytes(data)
            os.replace(staged, target)
        wait_for(lambda: _served_serial(handle.port, pki, "h2") == new, 20, "gRPC serving the renewed certificate")
        wait_for(lambda: _served_serial(handle.rest_port, pki, "http/1.1") == new, 20,
                 "REST serving the renewed certificate")
        before = list(calls)
        wait_for(lambda: calls[0] > before[0] and calls[1] > before[1], 20, "calls after the renewal")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert failures == [], failures[:5]
    assert calls[0] > 0 and calls[1] > 0
    assert "tls_reloaded" in handle.process.log_text()
    assert handle.process.alive()


def _pair_credentials(ca: Path, pair: tuple[Path, Path]) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca.read_bytes(), pair[1].read_bytes(), pair[0].read_bytes())


def test_a_rotated_client_ca_stops_trusting_the_old_one_on_both_ports(
        start_service: Callable[..., ServiceHandle], repo: Path, tmp_path: Path) -> None:
    """The REST port's trust store is the file's current content, not the old CAs plus the new:
    a caller whose certificate only the old CA signed is refused after the rotation."""
    pki = ensure_dev_pki(tmp_path / "pki")
    other = ensure_dev_pki(tmp_path / "other")  # a second CA, with its own client certificates
    client_ca = tmp_path / "client-ca.crt"
    shutil.copyfile(pki.ca.cert, client_ca)
    handle = start_service(repo, "--tls-cert", str(pki.service.cert), "--tls-key", str(pki.service.key),
                           "--tls-client-ca", str(client_ca), wait=False)
    old_client = (pki.gateway_client.cert, pki.gateway_client.key)
    new_client = (other.gateway_client.cert, other.gateway_client.key)
    wait_for(lambda: _ready(handle.address, _pair_credentials(pki.ca.cert, old_client)) is True, 60,
             "ServerReady over mTLS")
    assert _rest_live(handle.rest_port, client_context(pki.ca.cert, old_client)) == 200
    assert _rest_live(handle.rest_port, client_context(pki.ca.cert, new_client)) != 200

    staged = tmp_path / "staged-ca.crt"
    shutil.copyfile(other.ca.cert, staged)
    os.replace(staged, client_ca)
    wait_for(lambda: _ready(handle.address, _pair_credentials(pki.ca.cert, new_client)) is True, 20,
             "gRPC trusting the new client CA")
    wait_for(lambda: _rest_live(handle.rest_port, client_context(pki.ca.cert, new_client)) == 200, 20,
             "REST trusting the new client CA")
    assert _ready(handle.address, _pair_credentials(pki.ca.cert, old_client)) == "UNAVAILABLE"
    assert _rest_live(handle.rest_port, client_context(pki.ca.cert, old_client)) != 200
    # Without a client certificate, and with a plaintext request, the port still refuses.
    assert _rest_live(handle.rest_port, _client_context(pki, client_cert=False)) != 200
    assert handle.process.alive()
