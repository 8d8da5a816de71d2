"""TLS on the service's own ports: the gRPC port and the REST port take the same certificate, and
with a client CA both refuse any caller without a certificate that CA signed (mTLS: the gateway's
Envoy presents its own client certificate).

The files are read and checked once when the settings are validated, so a wrong path, a key that
does not belong to the certificate or a file that is not PEM stops ``sluice serve`` with one line
naming the flag, before any port is bound. The admin (metrics) port stays plain: it listens on
loopback by default and carries no model traffic.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

MAX_PEM_BYTES = 1024 * 1024
"""Largest certificate, key or CA bundle read (a chain of a few certificates is a few KiB)."""


class TlsSettingsError(ValueError):
    """The TLS files cannot be used; the message names the flag and what is wrong."""


@dataclass(frozen=True)
class ServerTls:
    """The PEM contents and paths of the service's TLS files (see :func:`load_server_tls`)."""

    cert_path: Path
    key_path: Path
    client_ca_path: Path | None
    cert: bytes
    key: bytes
    client_ca: bytes | None

    @property
    def mutual(self) -> bool:
        """Callers must present a certificate signed by the client CA."""
        return self.client_ca is not None


def _read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise TlsSettingsError(f"{flag} {path}: {size} bytes, more than a PEM file of {MAX_PEM_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise TlsSettingsError(f"{flag} {path}: {exc.strerror or exc}") from exc
    if marker not in data:
        raise TlsSettingsError(f"{flag} {path}: not PEM (no '{marker.decode()}' line)")
    return data


def load_server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    """The TLS files as given (None: plaintext), checked: both of cert and key, a key that matches
    the certificate, a client CA only with a certificate."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsSettingsError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)")
        return None
    if cert is None or key is None:
        raise TlsSettingsError("--tls-cert and --tls-key go together: give both or neither")
    cert_pem = _read_pem(cert, "--tls-cert", b"-----BEGIN CERTIFICATE-----")
    key_pem = _read_pem(key, "--tls-key", b"PRIVATE KEY-----")
    ca_pem = _read_pem(client_ca, "--tls-client-ca", b"-----BEGIN CERTIFICATE-----") if client_ca else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsSettingsError(f"--tls-key {key} does not belong to --tls-cert {cert} "
                               f"(or one of them is unreadable): {exc.reason or exc}") from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(client_ca)
        except ssl.SSLError as exc:
            raise TlsSettingsError(f"--tls-client-ca {client_ca}: {exc.reason or exc}") from exc
    return ServerTls(cert, key, client_ca, cert_pem, key_pem, ca_pem)


def grpc_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """gRPC server credentials: the certificate, and with a client CA a required client certificate."""
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.client_ca,
                                       require_client_auth=tls.mutual)


def uvicorn_options(tls: ServerTls | None) -> dict[str, Any]:
    """The uvicorn.Config arguments for the REST port (empty: plaintext)."""
    if tls is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert_path), "ssl_keyfile": str(tls.key_path)}
    if tls.client_ca_path is not None:
        options |= {"ssl_ca_certs": str(tls.client_ca_path), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
