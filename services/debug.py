"""The model service's part of a memory snapshot (``/debug/memory`` on the admin port): per loaded
version what is known of its memory.

ONNX Runtime's Python API exposes no counters of its CPU arena (how much it reserved, how much is
in use), so per version a snapshot carries what decides it: whether the arena is on, the model
file's size (initializers are held in memory once loaded), the thread pools, the execution
providers and the requests in flight. What ONNX Runtime holds shows in RSS: diff two snapshots
around a load or unload (docs/observability.md).

With ``--admin-tls-client-ca`` the admin port speaks HTTPS (``--admin-tls-cert``/``--admin-tls-key``,
else the service's ``--tls-cert``/``--tls-key``) and requires the admin identity, a client
certificate that CA signed (:func:`admin_tls`); renewed files serve new connections without a
restart (:class:`mesh.observability.admin_tls.AdminTls`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mesh.observability.admin_tls import AdminTls, admin_tls_of
from services.catalog import ModelCatalog

if TYPE_CHECKING:
    from services.settings import ServiceSettings

def admin_tls(settings: ServiceSettings) -> AdminTls | None:
    """The admin port's TLS (None: plain HTTP): --admin-tls-cert/--admin-tls-key (else the service's
    --tls-cert/--tls-key), and a client certificate signed by --admin-tls-client-ca required. The
    settings checked the files."""
    return admin_tls_of(settings.admin_tls_client_ca, (settings.admin_tls_cert, settings.admin_tls_key),
                        (settings.tls_cert, settings.tls_key))


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
