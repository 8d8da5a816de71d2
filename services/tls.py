"""TLS on the service's own ports: the gRPC port and the REST port take the same certificate, and
with a client CA both refuse any caller without a certificate that CA signed (mTLS: the gateway's
Envoy presents its own client certificate).

The files are read and checked once when the settings are validated, so a wrong path, a key that
does not belong to the certificate or a file that is not PEM stops ``sluice serve`` with one line
naming the flag, before any port is bound. The admin (metrics) port stays plain: it listens on
loopback by default and carries no model traffic.

Renewed files take effect without a restart (:class:`CertificateReloader`): a changed set is
checked the same way first; a set that fails the check (a key written before its certificate, a
half-written file) keeps the old one serving and is logged once. Connections already open keep
the certificate of their handshake; new ones get the new one.
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from mesh.tls_files import MAX_PEM_BYTES, read_server_files
from mesh.tls_files import TlsFileError as TlsSettingsError

__all__ = ["MAX_PEM_BYTES", "CertificateReloader", "ServerTls", "TlsSettingsError", "grpc_credentials",
           "load_server_tls", "uvicorn_options"]

log = structlog.get_logger(__name__)


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


_Stamp = tuple[tuple[int, int, int] | None, ...]


class CertificateReloader:
    """Serves the newest valid set of the TLS files: gRPC asks :meth:`fetch` at each handshake,
    and the REST port's ``ssl.SSLContext`` is loaded again in place (:meth:`watch_context`).

    A file's (mtime, size, inode) is looked at most once per ``interval`` seconds; a change is
    read and checked with :func:`load_server_tls` before anything serves it.
    """

    def __init__(self, tls: ServerTls, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._tls = tls
        self._generation = 0
        self._fetched = 0
        self._stamp = self._stamps()
        self._refused: _Stamp | None = None
        self._checked_at = time.monotonic()
        self._contexts: list[ssl.SSLContext] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def tls(self) -> ServerTls:
        """The set now served."""
        return self._tls

    def _paths(self) -> tuple[Path, ...]:
        tls = self._tls
        return (tls.cert_path, tls.key_path) + ((tls.client_ca_path,) if tls.client_ca_path else ())

    def _stamps(self) -> _Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            try:
                found = path.stat()
                stamps.append((found.st_mtime_ns, found.st_size, found.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def check(self) -> bool:
        """Load the files again if they changed and pass the checks; True when a new set serves."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self.interval:
                return False
            self._checked_at = now
            stamp = self._stamps()
            if stamp in (self._stamp, self._refused):
                return False
            old = self._tls
            try:
                new = load_server_tls(old.cert_path, old.key_path, old.client_ca_path)
                if new is None:  # cannot be: both paths are given
                    raise TlsSettingsError("no TLS files")
                for context in self._contexts:
                    _load_into(context, new)
            except (TlsSettingsError, ssl.SSLError, OSError) as exc:
                self._refused = stamp  # logged once per state of the files, retried when they change
                log.warning("tls_reload_refused", reason=str(exc), serving="the previous certificate")
                return False
            self._tls, self._stamp, self._refused = new, stamp, None
            self._generation += 1
        log.info("tls_reloaded", cert=str(new.cert_path), mutual=new.mutual)
        return True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher: a new configuration after a reload, else None
        (keep the current one). Runs on gRPC's threads at each handshake; never raises."""
        try:
            self.check()
        except Exception:  # a fetcher that raises fails the handshake
            log.exception("tls_reload_failed")
        with self._lock:
            if self._fetched == self._generation:
                return None
            self._fetched = self._generation
            return _certificate_configuration(self._tls)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files (see :meth:`fetch`)."""
        # grpcio documents None from the fetcher as "keep the current configuration"; its stub
        # does not say so.
        fetcher: Any = self.fetch
        return grpc.dynamic_ssl_server_credentials(_certificate_configuration(self._tls), fetcher,
                                                   require_client_authentication=self._tls.mutual)

    def watch_context(self, context: ssl.SSLContext) -> None:
        """Load every new set into ``context`` too (uvicorn's, for the REST port); a thread looks
        at the files once per ``interval`` so that a REST-only caller also gets the new set."""
        with self._lock:
            self._contexts.append(context)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="tls-reload", daemon=True)
                self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("tls_reload_failed")

    def stop(self) -> None:
        self._stop.set()


def _certificate_configuration(tls: ServerTls) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(tls.key, tls.cert)], root_certificates=tls.client_ca)


def _load_into(context: ssl.SSLContext, tls: ServerTls) -> None:
    context.load_cert_chain(tls.cert_path, tls.key_path)
    if tls.client_ca_path is not None:
        context.load_verify_locations(tls.client_ca_path)
