"""PEM files of a TLS setting, read and checked the same way by every component.

A service (``sluice serve --tls-…``) and the gateway (``sluice gateway --tls-…`` and
``--upstream-tls-…``) take certificates, keys and CA bundles as file paths. Each is read with a
size cap, checked to be PEM of the right kind, and a key is checked to belong to its certificate,
so a wrong file stops a start with one line naming the flag (or, for a renewed file the gateway
watches, is refused while the old one stays in force). Standard library only.
"""

from __future__ import annotations

import ssl
from pathlib import Path

MAX_PEM_BYTES = 1024 * 1024
"""Largest certificate, key or CA bundle read (a chain of a few certificates is a few KiB)."""
CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
KEY_MARKER = b"PRIVATE KEY-----"


class TlsFileError(ValueError):
    """A TLS file cannot be used; the message names the flag and what is wrong."""


def read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    """The bytes of ``path`` if it is at most :data:`MAX_PEM_BYTES` and holds a ``marker`` line."""
    try:
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise TlsFileError(f"{flag} {path}: {size} bytes, more than a PEM file of {MAX_PEM_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{flag} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PEM_BYTES:  # grew between stat and read
        raise TlsFileError(f"{flag} {path}: more than a PEM file of {MAX_PEM_BYTES} bytes")
    if marker not in data:
        raise TlsFileError(f"{flag} {path}: not PEM (no '{marker.decode()}' line)")
    return data


def read_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """(certificate chain, key) as bytes, checked to be PEM and to belong together.

    OpenSSL reads the files by path, so they are read again after the check: a pair that changed
    in between (a renewal writing one file, then the other) is refused rather than half-checked.
    """
    cert_pem = read_pem(cert, cert_flag, CERT_MARKER)
    key_pem = read_pem(key, key_flag, KEY_MARKER)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsFileError(f"{key_flag} {key} does not belong to {cert_flag} {cert} "
                           f"(or one of them is unreadable): {exc.reason or exc}") from exc
    except OSError as exc:
        raise TlsFileError(f"{cert_flag} {cert} / {key_flag} {key}: {exc.strerror or exc}") from exc
    if read_pem(cert, cert_flag, CERT_MARKER) != cert_pem or read_pem(key, key_flag, KEY_MARKER) != key_pem:
        raise TlsFileError(f"{cert_flag} {cert} / {key_flag} {key}: changed while being checked")
    return cert_pem, key_pem


def read_ca(path: Path, flag: str) -> bytes:
    """A CA bundle as bytes, checked to hold certificates OpenSSL can load."""
    data = read_pem(path, flag, CERT_MARKER)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else None
        raise TlsFileError(f"{flag} {path}: {reason or exc}") from exc
    return data


def read_server_files(cert: Path | None, key: Path | None, client_ca: Path | None,
                      flag: str = "--tls") -> tuple[bytes, bytes, bytes | None] | None:
    """(certificate, key, client CA or None) of a TLS server's flags ``<flag>-cert``, ``<flag>-key``,
    ``<flag>-client-ca``, checked; None when neither certificate nor key is given (plaintext).

    A key and a certificate go together, and a client CA (mTLS) needs both.
    """
    cert_flag, key_flag, ca_flag = f"{flag}-cert", f"{flag}-key", f"{flag}-client-ca"
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsFileError(f"{ca_flag} needs {cert_flag} and {key_flag} (mTLS is TLS first)")
        return None
    if cert is None or key is None:
        raise TlsFileError(f"{cert_flag} and {key_flag} go together: give both or neither")
    cert_pem, key_pem = read_key_pair(cert, key, cert_flag, key_flag)
    return cert_pem, key_pem, read_ca(client_ca, ca_flag) if client_ca is not None else None
