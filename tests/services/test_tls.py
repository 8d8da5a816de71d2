"""TLS and mTLS on the service's gRPC and REST ports, with the dev stack's throwaway CA
(mesh/devstack/pki.py): a real `sluice serve`, real handshakes."""

from __future__ import annotations

import http.client
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from mesh.devstack.pki import DevPki, ensure_dev_pki
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle, sluice_argv
from tests.services.models import identity, write_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("run") / "pki")


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
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.check_hostname = False  # 127.0.0.1 is in the certificate; the CA is what is checked here
    if client_cert:
        context.load_cert_chain(pki.gateway_client.cert, pki.gateway_client.key)
    return context


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
    argv = sluice_argv("serve", "--repo", str(repo), "--port", "0", "--metrics-port", "-1", "--rest-port", "-1",
                       *(str(paths.get(flag, flag)) for flag in flags))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
