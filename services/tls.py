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

from mesh.tls_files import MAX_PEM_BYTES, read_server_files
from mesh.tls_files import TlsFileError as TlsSettingsError

__all__ = ["MAX_PEM_BYTES", "ServerTls", "TlsSettingsError", "grpc_credentials", "load_server_tls", "uvicorn_options"]


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


def load_server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ServerTls | None:
    """The TLS files as given (None: plaintext), checked (:func:`mesh.tls_files.read_server_files`):
    both of cert and key, a key that matches the certificate, a client CA only with a certificate."""
    files = read_server_files(cert, key, client_ca)
    if files is None or cert is None or key is None:  # None: neither was given
        return None
    cert_pem, key_pem, ca_pem = files
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
