"""The admin identity on the admin (metrics) port: ``sluice serve --admin-tls-client-ca`` serves
/metrics and /debug/ over HTTPS to callers with a client certificate that CA signed, and
``sluice debug`` presents one. A real `sluice serve`, real handshakes, the dev stack's throwaway
CA (mesh/devstack/pki.py) plus a second one whose certificates must not pass."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from mesh.devstack.pki import DevPki, ensure_dev_pki
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.pki import check_admin_only, client_context, https_get, no_answer
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle, serve_refused, sluice_argv
from tests.services.models import identity, write_model
from tests.services.test_debug import own_non_loopback_address

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """Another throwaway CA: its client certificate is valid, but not signed by the admin CA."""
    return ensure_dev_pki(tmp_path_factory.mktemp("other") / "pki")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(root, "echo", identity("FP32", [1, 4]))
    return root


def _tls_ready(handle: ServiceHandle, pki: DevPki) -> bool:
    credentials = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes())
    with grpc.secure_channel(handle.address, credentials,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as channel:
        try:
            return bool(pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(),
                                                                              timeout=3).ready)
        except grpc.RpcError:
            return False


def _start(start_service: Callable[..., ServiceHandle], repo: Path, pki: DevPki, *extra: str) -> ServiceHandle:
    handle = start_service(repo, "--tls-cert", str(pki.service.cert), "--tls-key", str(pki.service.key),
                           "--admin-tls-client-ca", str(pki.ca.cert), *extra, wait=False)
    wait_for(lambda: _tls_ready(handle, pki), 60, "ServerReady over TLS")
    return handle


def test_admin_port_answers_only_the_admin_certificate(start_service: Callable[..., ServiceHandle],
                                                       pki: DevPki, stranger: DevPki, repo: Path) -> None:
    handle = _start(start_service, repo, pki)
    admin = client_context(pki.ca.cert, (pki.client.cert, pki.client.key))
    stranger_pair = client_context(pki.ca.cert, (stranger.client.cert, stranger.client.key))
    check_admin_only(handle.metrics_port, admin, [client_context(pki.ca.cert), stranger_pair], "sluice_loaded_versions")

    # A caller that connects and says nothing holds a thread, not the port.
    with socket.create_connection(("127.0.0.1", handle.metrics_port), timeout=10):
        assert https_get(f"https://127.0.0.1:{handle.metrics_port}/debug/threads?format=json", admin)[0] == 200
    assert handle.process.alive()
    assert "Traceback" not in handle.process.log_text()


def test_auto_answers_the_admin_identity_beyond_loopback(start_service: Callable[..., ServiceHandle],
                                                         pki: DevPki, repo: Path) -> None:
    address = own_non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    handle = _start(start_service, repo, pki, "--metrics-host", "0.0.0.0")
    admin = client_context(pki.ca.cert, (pki.client.cert, pki.client.key), check_hostname=False)
    # Plain --debug-endpoints auto answers 403 from here (tests/services/test_debug.py).
    assert https_get(f"https://{address}:{handle.metrics_port}/debug/threads", admin)[0] == 200
    assert no_answer(f"https://{address}:{handle.metrics_port}/debug/threads",
                     client_context(pki.ca.cert, check_hostname=False))
    assert "debug_endpoints_unauthenticated" not in handle.process.log_text()


def _debug(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("SLUICE_CA", "SLUICE_CLIENT_CERT", "SLUICE_CLIENT_KEY")
             and not k.startswith("SLUICE_ADMIN_")}
    return subprocess.run(sluice_argv("debug", *args), capture_output=True, text=True, timeout=60, check=False,
                          env={**clean, **(env or {})})


def test_sluice_debug_threads_presents_the_admin_certificate(start_service: Callable[..., ServiceHandle],
                                                             pki: DevPki, repo: Path) -> None:
    handle = _start(start_service, repo, pki)
    target = f"127.0.0.1:{handle.metrics_port}"
    done = _debug("threads", target, "--admin-ca", str(pki.ca.cert), "--admin-cert", str(pki.client.cert),
                  "--admin-key", str(pki.client.key))
    assert done.returncode == 0, done.stderr
    assert "Thread MainThread" in done.stdout

    # The same from the environment (what `sluice env` exports for `sluice up --secure`).
    done = _debug("threads", target, "--json", env={"SLUICE_CA": str(pki.ca.cert),
                                                    "SLUICE_CLIENT_CERT": str(pki.client.cert),
                                                    "SLUICE_CLIENT_KEY": str(pki.client.key)})
    assert done.returncode == 0, done.stderr
    assert '"threads"' in done.stdout

    for args, message in (((), "--admin-cert, --admin-key and --admin-ca"),  # plain HTTP to an HTTPS port
                          (("--admin-ca", str(pki.ca.cert)), "TLS with the admin port"),  # no client certificate
                          (("--admin-cert", str(pki.client.cert), "--admin-key", str(pki.client.key)),
                           "need --admin-ca")):
        done = _debug("threads", target, *args)
        assert done.returncode == 1, (args, done.stdout)
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert handle.process.alive()


def test_renewed_certificate_serves_the_admin_port_without_a_restart(
        start_service: Callable[..., ServiceHandle], repo: Path, tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    handle = _start(start_service, repo, pki)
    admin = client_context(pki.ca.cert, (pki.client.cert, pki.client.key))

    def serial() -> int:
        with socket.create_connection(("127.0.0.1", handle.metrics_port), timeout=10) as raw, \
                admin.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    old = serial()
    side = tmp_path / "renewed"
    shutil.copytree(pki.directory, side)
    (side / pki.service.cert.name).unlink()
    renewed = ensure_dev_pki(side)
    for source, target in ((renewed.service.key, pki.service.key), (renewed.service.cert, pki.service.cert)):
        staged = tmp_path / f"staged-{target.name}"
        shutil.copyfile(source, staged)
        os.replace(staged, target)
    wait_for(lambda: serial() != old, 20, "the admin port serving the renewed certificate")
    assert https_get(f"https://127.0.0.1:{handle.metrics_port}/metrics", admin)[0] == 200
    assert "admin_tls_reloaded" in handle.process.log_text()


@pytest.mark.parametrize(("flags", "message"), [
    (("--admin-tls-client-ca", "{ca.cert}"),
     "--admin-tls-client-ca needs --admin-tls-cert and --admin-tls-key, or --tls-cert and --tls-key"),
    (("--admin-tls-cert", "{service.cert}", "--admin-tls-key", "{service.key}"), "need --admin-tls-client-ca"),
    (("--admin-tls-cert", "{service.cert}", "--admin-tls-client-ca", "{ca.cert}"),
     "--admin-tls-cert and --admin-tls-key go together"),
    (("--admin-tls-cert", "{service.cert}", "--admin-tls-key", "{client.key}", "--admin-tls-client-ca", "{ca.cert}"),
     "--admin-tls-key"),
    (("--tls-cert", "{service.cert}", "--tls-key", "{service.key}", "--admin-tls-client-ca", "{service.key}"),
     "--admin-tls-client-ca"),
    (("--tls-cert", "{service.cert}", "--tls-key", "{service.key}", "--admin-tls-client-ca", "{missing}"),
     "No such file"),
])
def test_unusable_admin_ca_stops_the_start_with_one_line(pki: DevPki, repo: Path, tmp_path: Path,
                                                         flags: tuple[str, ...], message: str) -> None:
    paths = {"{service.cert}": pki.service.cert, "{service.key}": pki.service.key, "{ca.cert}": pki.ca.cert,
             "{client.key}": pki.client.key, "{missing}": tmp_path / "nope.crt"}
    stderr = serve_refused(repo, *(str(paths.get(flag, flag)) for flag in flags))
    assert message in stderr, stderr


def test_debug_on_beyond_loopback_without_the_admin_identity_warns(
        start_service: Callable[..., ServiceHandle], repo: Path) -> None:
    handle = start_service(repo, "--debug-endpoints", "on", "--metrics-host", "0.0.0.0")
    wait_for(lambda: "debug_endpoints_unauthenticated" in handle.process.log_text(), 10, "the warning")
    quiet = start_service(repo, "--debug-endpoints", "on")  # loopback only: no warning
    assert "debug_endpoints_unauthenticated" not in quiet.process.log_text()


def test_admin_port_speaks_https_with_its_own_certificate_while_the_model_ports_stay_plain(
        start_service: Callable[..., ServiceHandle], pki: DevPki, repo: Path) -> None:
    """--admin-tls-cert/--admin-tls-key: the admin identity without TLS on gRPC and REST (the Helm
    chart's case: Envoy reaches the services in plaintext or through the mesh)."""
    handle = start_service(repo, "--admin-tls-cert", str(pki.service.cert), "--admin-tls-key", str(pki.service.key),
                           "--admin-tls-client-ca", str(pki.admin_ca.cert))
    with grpc.insecure_channel(handle.address) as channel:  # the gRPC port is plaintext
        assert pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    admin = client_context(pki.ca.cert, (pki.admin.cert, pki.admin.key))
    # The admin CA is its own: the model client's certificate (another CA) opens nothing here.
    model_client = client_context(pki.ca.cert, (pki.client.cert, pki.client.key))
    check_admin_only(handle.metrics_port, admin, [model_client], "sluice_loaded_versions")
