"""The throwaway PKI of ``sluice up --secure``: real TLS handshakes on loopback with the files it makes."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from mesh.devstack.pki import CLIENT_SAN, GATEWAY_CLIENT_SAN, DevPki, ensure_dev_pki, load_signing_key


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str) -> str | None:
    """Run one TLS handshake over loopback; the server side's error text, or None when it succeeded."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    outcome: list[str | None] = []

    def serve() -> None:
        connection, _ = listener.accept()
        connection.settimeout(10)
        try:
            with server.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"ok")
            outcome.append(None)
        except (ssl.SSLError, OSError) as exc:
            outcome.append(str(exc))
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client.wrap_socket(raw, server_hostname=server_hostname) as tls:
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(10)
        listener.close()
    return outcome[0] if outcome else "no handshake"


def _server(pki: DevPki, *, require_client: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.gateway.cert, pki.gateway.key)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca.cert)
    return context


def _client(pki: DevPki, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if pair is not None:
        context.load_cert_chain(*pair)
    return context


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_the_gateway_certificate_verifies_against_the_ca_for_loopback_names(pki: DevPki, hostname: str) -> None:
    assert _handshake(_server(pki, require_client=False), _client(pki), hostname) is None


def test_a_foreign_name_does_not_verify(pki: DevPki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|doesn't match"):
        _handshake(_server(pki, require_client=False), _client(pki), "example.com")


def test_mutual_tls_takes_the_client_certificates_and_refuses_a_caller_without_one(pki: DevPki) -> None:
    server = _server(pki, require_client=True)
    assert _handshake(server, _client(pki, (pki.gateway_client.cert, pki.gateway_client.key)), "localhost") is None
    assert _handshake(server, _client(pki, (pki.client.cert, pki.client.key)), "localhost") is None
    with pytest.raises((ssl.SSLError, OSError)):
        _handshake(server, _client(pki), "localhost")


def test_client_certificates_carry_their_identities(pki: DevPki) -> None:
    for pair, uri in ((pki.gateway_client, GATEWAY_CLIENT_SAN), (pki.client, CLIENT_SAN)):
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.UniformResourceIdentifier) == [uri]


def test_keys_are_private_and_the_directory_too(pki: DevPki) -> None:
    assert stat.S_IMODE(os.stat(pki.directory).st_mode) == 0o700
    for key in (pki.ca.key, pki.gateway.key, pki.service.key, pki.gateway_client.key, pki.client.key, pki.jwt_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key


def test_a_second_run_keeps_valid_files_and_replaces_broken_ones(tmp_path: Path) -> None:
    first = ensure_dev_pki(tmp_path / "pki")
    ca_before = first.ca.cert.read_bytes()
    signing_before = first.jwt_key.read_bytes()
    first.service.cert.write_text("not a certificate")
    second = ensure_dev_pki(tmp_path / "pki")
    assert second.ca.cert.read_bytes() == ca_before
    assert second.jwt_key.read_bytes() == signing_before
    assert second.service.cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(second.service.cert, second.service.key)
    assert _handshake(server, _client(second), "localhost") is None
    load_signing_key(second.jwt_key)
