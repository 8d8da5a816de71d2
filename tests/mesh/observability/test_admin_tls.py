"""The admin port's renewable TLS (mesh/observability/admin_tls.py), shared by the service and the
gateway controller: a real AdminServer over HTTPS, real handshakes, files renewed in place by
moving new ones in (as a Kubernetes Secret's ``..data`` swap does)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from mesh.devstack.pki import DevPki, ensure_dev_pki
from mesh.observability.admin import AdminServer
from mesh.observability.admin_tls import AdminTls

pytestmark = pytest.mark.timeout(60)


def _admin_context(pki: DevPki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    context.load_cert_chain(pki.admin.cert, pki.admin.key)
    return context


def _serial(port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert tls.recv(12).startswith(b"HTTP/1.0 200")
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _move_in(source: Path, target: Path) -> None:
    staged = target.with_name(f".staged-{target.name}")
    shutil.copyfile(source, staged)
    os.replace(staged, target)


def test_renewed_files_serve_new_connections_and_a_broken_set_keeps_the_old(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    tls = AdminTls(pki.service.cert, pki.service.key, pki.admin_ca.cert, interval=0.0,
                   flags=("--admin-tls-cert", "--admin-tls-key", "--admin-tls-client-ca"))
    server = AdminServer(CollectorRegistry(), component="test", tls=tls)
    port = server.start("127.0.0.1", 0)
    try:
        admin = _admin_context(pki)
        first = _serial(port, admin)

        # A broken certificate: refused once in the log, the old one serves on.
        broken = tmp_path / "broken.crt"
        broken.write_text("not a certificate\n")
        with capture_logs() as logs:
            _move_in(broken, pki.service.cert)
            assert _serial(port, admin) == first
            assert _serial(port, admin) == first
        refused = [e for e in logs if e["event"] == "admin_tls_reload_refused"]
        assert len(refused) == 1 and "--admin-tls-cert" in refused[0]["reason"]

        # A renewed pair (same CA): new connections get it.
        side = tmp_path / "renewed"
        shutil.copytree(pki.directory, side)
        (side / pki.service.cert.name).unlink()
        renewed = ensure_dev_pki(side)
        _move_in(renewed.service.key, pki.service.key)
        _move_in(renewed.service.cert, pki.service.cert)
        assert _serial(port, admin) != first
    finally:
        server.close()


def test_the_admin_ca_decides_who_gets_in(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    server = AdminServer(CollectorRegistry(), component="test",
                         tls=AdminTls(pki.service.cert, pki.service.key, pki.admin_ca.cert))
    port = server.start("127.0.0.1", 0)
    try:
        assert _serial(port, _admin_context(pki)) > 0
        other = ssl.create_default_context(cafile=str(pki.ca.cert))
        other.load_cert_chain(pki.client.cert, pki.client.key)  # a valid certificate of the other CA
        with pytest.raises((ssl.SSLError, ConnectionResetError, AssertionError)):
            _serial(port, other)
    finally:
        server.close()
