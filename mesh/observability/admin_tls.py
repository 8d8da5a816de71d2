"""The admin identity of an admin port (mesh/observability/admin.py), as files that may be renewed.

A service (``sluice serve --admin-tls-client-ca``) and the gateway controller (``sluice gateway
--admin-tls-client-ca``) serve ``/metrics`` and ``/debug/`` over HTTPS with a certificate and key
of their own, and require a client certificate that the admin CA signed. :class:`AdminTls` is the
function the admin port calls for each new connection's context: it makes the context again when
the files change, so a renewed certificate (or admin CA) serves new connections without a restart.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from mesh.observability.admin import admin_tls_context
from mesh.tls_files import ReloadingContext, read_ca, read_key_pair


class AdminTls(ReloadingContext):
    """The admin port's SSL context, made again when its files change (mesh.tls_files'
    :class:`~mesh.tls_files.ReloadingContext`: looked at once per ``interval`` at most, a broken
    renewal keeps the old context and is logged once as ``admin_tls_reload_refused``).

    ``flags`` name the three files in errors and log lines (the component's own flag names)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path, interval: float = 1.0, *,
                 flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--admin-tls-client-ca")) -> None:
        self.flags = flags
        super().__init__((cert, key, client_ca), self._checked_context, interval=interval,
                         events=("admin_tls_reloaded", "admin_tls_reload_refused"))

    def _checked_context(self) -> ssl.SSLContext:
        cert, key, client_ca = self.paths
        cert_flag, key_flag, ca_flag = self.flags
        read_key_pair(cert, key, cert_flag, key_flag)
        read_ca(client_ca, ca_flag)
        return admin_tls_context(cert, key, client_ca)


def admin_tls_of(client_ca: Path | None, admin_pair: tuple[Path | None, Path | None],
                 own_pair: tuple[Path | None, Path | None]) -> AdminTls | None:
    """A component's admin TLS from its flags (None: plain HTTP): with ``--admin-tls-client-ca``
    (``client_ca``), the admin pair (``--admin-tls-cert``/``--admin-tls-key``) when both are given,
    else the component's own ``--tls-cert``/``--tls-key``; a client certificate that CA signed is
    required. The service and the gateway controller share this rule; their settings checked the files."""
    if client_ca is None:
        return None
    cert, key = admin_pair
    if cert is not None and key is not None:
        return AdminTls(cert, key, client_ca, flags=("--admin-tls-cert", "--admin-tls-key", "--admin-tls-client-ca"))
    cert, key = own_pair
    if cert is None or key is None:
        return None
    return AdminTls(cert, key, client_ca)
