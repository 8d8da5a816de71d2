"""The model service's part of a memory snapshot (``/debug/memory`` on the admin port): per loaded
version what is known of its memory.

ONNX Runtime's Python API exposes no counters of its CPU arena (how much it reserved, how much is
in use), so per version a snapshot carries what decides it: whether the arena is on, the model
file's size (initializers are held in memory once loaded), the thread pools, the execution
providers and the requests in flight. What ONNX Runtime holds shows in RSS: diff two snapshots
around a load or unload (docs/observability.md).

With ``--admin-tls-client-ca`` the admin port speaks HTTPS with the service's certificate and
requires the admin identity, a client certificate that CA signed (:func:`admin_tls`); renewed
files serve new connections without a restart (:class:`AdminTls`).
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mesh.observability.admin import admin_tls_context
from mesh.tls_files import FileStamps, TlsFileError, file_stamps, read_ca, read_key_pair
from services.catalog import ModelCatalog

if TYPE_CHECKING:
    from services.settings import ServiceSettings

log = structlog.get_logger(__name__)


def admin_tls(settings: ServiceSettings) -> AdminTls | None:
    """The admin port's TLS (None: plain HTTP): the service's --tls-cert/--tls-key, and a client
    certificate signed by --admin-tls-client-ca required. The settings checked the files."""
    if settings.admin_tls_client_ca is None or settings.tls_cert is None or settings.tls_key is None:
        return None
    return AdminTls(settings.tls_cert, settings.tls_key, settings.admin_tls_client_ca)


class AdminTls:
    """The admin port's SSL context, made again when its files change (a renewed certificate serves
    new connections without a restart, as on the gRPC and REST ports). Called once per connection;
    the files' (mtime, size, inode) are looked at most once per ``interval`` seconds, and a changed
    set that fails the checks of mesh.tls_files keeps the old context and is logged once."""

    def __init__(self, cert: Path, key: Path, client_ca: Path, interval: float = 1.0) -> None:
        self.paths = (cert, key, client_ca)
        self.interval = interval
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._refused: tuple[tuple[int, int, int] | None, ...] | None = None
        self._context = admin_tls_context(cert, key, client_ca)
        self._checked_at = time.monotonic()

    def _stamps(self) -> FileStamps:
        return file_stamps(self.paths)

    def __call__(self) -> ssl.SSLContext:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self.interval:
                return self._context
            self._checked_at = now
            stamp = self._stamps()
            if stamp in (self._stamp, self._refused):
                return self._context
            cert, key, client_ca = self.paths
            try:
                read_key_pair(cert, key, "--tls-cert", "--tls-key")
                read_ca(client_ca, "--admin-tls-client-ca")
                context = admin_tls_context(cert, key, client_ca)
            except (TlsFileError, ssl.SSLError, OSError) as exc:
                self._refused = stamp
                log.warning("admin_tls_reload_refused", reason=str(exc)[:300], serving="the previous certificate")
                return self._context
            self._context, self._stamp, self._refused = context, stamp, None
        log.info("admin_tls_reloaded", cert=str(cert))
        return context


def version_memory(catalog: ModelCatalog) -> dict[str, Any]:
    """``{"versions": [...]}``, one entry per version served now (draining copies are left out)."""
    versions: list[dict[str, Any]] = []
    for name, served_versions in sorted(catalog.served().items()):
        for version, served in sorted(served_versions.items()):
            model = served.model
            session = model.config.session
            try:
                file_bytes: int | None = os.stat(model.path).st_size
            except OSError:
                file_bytes = None  # the file went away; the session still holds what it loaded
            versions.append({
                "model": name, "version": version, "sha256": model.sha256, "model_file_bytes": file_bytes,
                "cpu_memory_arena": session.memory_arena, "intra_op_threads": session.intra_op_threads,
                "inter_op_threads": session.inter_op_threads, "providers": list(model.providers),
                "inflight": served.inflight,
            })
    return {"versions": versions, "loaded": len(versions)}
