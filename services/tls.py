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
the certificate of their handshake; new ones get the new one. Both ports serve exactly the bytes
that passed the check: the REST port gets a fresh ``ssl.SSLContext`` built from them (never the
files read a second time, and never CAs added to the old trust store), swapped in at each
handshake, so a client CA taken out of the file is no longer trusted on either port.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from mesh.tls_files import MAX_PEM_BYTES, ReloadingFiles, read_server_files
from mesh.tls_files import TlsFileError as TlsSettingsError

__all__ = ["MAX_PEM_BYTES", "CertificateReloader", "ServerTls", "TlsSettingsError", "grpc_credentials",
           "load_server_tls", "server_context", "uvicorn_options"]

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


class CertificateReloader:
    """Serves the newest valid set of the TLS files: gRPC asks :meth:`fetch` at each handshake,
    and the REST port's handshakes switch to a context built from that set (:meth:`watch_context`).

    The files are followed by :class:`mesh.tls_files.ReloadingFiles` (looked at most once per
    ``interval`` seconds); a change is read and checked with :func:`load_server_tls` before
    anything serves it, and a set refused keeps the old one (``tls_reload_refused``, once).
    """

    def __init__(self, tls: ServerTls, interval: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._fetched = 0
        self._rest_context: ssl.SSLContext | None = None  # built from the set served once watched
        paths = (tls.cert_path, tls.key_path) + ((tls.client_ca_path,) if tls.client_ca_path else ())
        self._files: ReloadingFiles[tuple[ServerTls, ssl.SSLContext | None]] = ReloadingFiles(
            paths, self._load, interval=interval, first=(tls, None), events=("tls_reloaded", "tls_reload_refused"),
            fields=lambda value: {"cert": str(value[0].cert_path), "mutual": value[0].mutual})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        return self._files.interval

    @property
    def tls(self) -> ServerTls:
        """The set now served."""
        return self._files.value[0]

    def _load(self) -> tuple[ServerTls, ssl.SSLContext | None]:
        old = self.tls
        new = load_server_tls(old.cert_path, old.key_path, old.client_ca_path)
        if new is None:  # cannot be: both paths are given
            raise TlsSettingsError("no TLS files")
        return new, None if self._rest_context is None else server_context(new)

    def check(self) -> bool:
        """Load the files again if they changed and pass the checks; True when a new set serves."""
        (_, rest), changed = self._files.check()
        if changed:
            with self._lock:
                if rest is not None:
                    self._rest_context = rest
                self._generation += 1
        return changed

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
            return _certificate_configuration(self.tls)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files (see :meth:`fetch`)."""
        # grpcio documents None from the fetcher as "keep the current configuration"; its stub
        # does not say so.
        fetcher: Any = self.fetch
        return grpc.dynamic_ssl_server_credentials(_certificate_configuration(self.tls), fetcher,
                                                   require_client_authentication=self.tls.mutual)

    def watch_context(self, context: ssl.SSLContext) -> None:
        """Make every handshake on ``context`` (uvicorn's, for the REST port) use a context built
        from the set now served (:func:`server_context`), switched to from its ``sni_callback``,
        which OpenSSL runs on every ClientHello, with or without a server name. A thread looks at
        the files once per ``interval`` so that a REST-only caller also gets a new set."""
        with self._lock:
            self._rest_context = server_context(self.tls)
            context.sni_callback = self._select
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="tls-reload", daemon=True)
                self._thread.start()

    def _select(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        current = self._rest_context  # one read: a reload swaps the reference, never edits it
        if current is not None and current is not context:
            connection.context = current

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


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """A new server context holding exactly ``tls``'s checked bytes: the key and certificate go
    through a private (0600) temporary directory, removed at once, since ``ssl`` loads a chain only
    from files; the client CA is loaded from memory. A handshake switched to it keeps the
    listening context's protocol and cipher settings (OpenSSL takes only the certificate, key and
    trust store from the context switched to); the verify mode is set here as well."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="sluice-tls-") as directory:  # mode 0700
        cert, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
        for path, data in ((cert, tls.cert), (key, tls.key)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        context.load_cert_chain(cert, key)
    if tls.client_ca is not None:
        context.load_verify_locations(cadata=tls.client_ca.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
