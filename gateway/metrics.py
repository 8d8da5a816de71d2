"""Prometheus metrics of the gateway controller (one Prometheus registry per controller, so tests can run several),
served with ``/debug/`` on its metrics (admin) port; HTTPS with the admin identity under
``--admin-tls-client-ca`` (:func:`admin_tls`).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from mesh.observability.admin import AdminServer
from mesh.observability.admin_tls import AdminTls, admin_tls_of

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def admin_tls(settings: GatewaySettings) -> AdminTls | None:
    """The metrics port's TLS (None: plain HTTP): --admin-tls-cert/--admin-tls-key, else the listener's
    --tls-cert/--tls-key, and a client certificate signed by --admin-tls-client-ca required. The
    settings checked the files; renewed ones serve new connections without a restart."""
    return admin_tls_of(settings.admin_tls_client_ca, (settings.admin_tls_cert, settings.admin_tls_key),
                        (settings.tls_cert, settings.tls_key))


class GatewayMetrics:
    """The gateway's metrics, in their own Prometheus registry (:attr:`prometheus_registry`)."""

    def __init__(self) -> None:
        self.prometheus_registry = CollectorRegistry()
        r = self.prometheus_registry
        self.publish_seconds = Histogram(
            "sluice_gateway_publish_seconds",
            "Registry change seen → Envoy confirmed the new snapshot live (debounce included).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.validate_seconds = Histogram(
            "sluice_gateway_validate_seconds", "Time of one envoy --mode validate run.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.publishes = Counter(
            "sluice_gateway_publishes", "Snapshot publications by result "
            "(ok, inconsistent, invalid, publish_failed, confirm_failed).", ["result"], registry=r)
        self.validations = Counter(
            "sluice_gateway_validations", "Envoy validations by result (ok, failed, cached).", ["result"],
            registry=r)
        self.snapshot_revision = Gauge(
            "sluice_gateway_snapshot_revision", "etcd revision rendered into the live snapshot.", registry=r)
        self.snapshot = Info("sluice_gateway_snapshot", "Version of the live snapshot.", registry=r)
        self.watch_lag = Gauge(
            "sluice_gateway_watch_lag_seconds",
            "How long the controller's registry view has been behind etcd (a write under the prefix "
            "that its watch has not delivered yet); 0 when caught up. Checked every second.", registry=r)
        self.envoy_up = Gauge("sluice_gateway_envoy_up", "1 while Envoy's admin API answers.", registry=r)
        self.envoy_restarts = Counter("sluice_gateway_envoy_restarts", "Envoy restarts by the supervisor.",
                                      registry=r)
        self.envoy_hot_restarts = Counter("sluice_gateway_envoy_hot_restarts",
                                          "Envoy hot restarts (new epoch took over, old one drained).", registry=r)
        self.etcd_connected = Gauge("sluice_gateway_etcd_connected", "1 while the registry watch is connected.",
                                    registry=r)
        self.models = Gauge("sluice_gateway_models", "Models in the live snapshot.", registry=r)
        self.admin: AdminServer | None = None

    def serve(self, host: str, port: int, tls: Callable[[], ssl.SSLContext] | None = None) -> int:
        """Expose ``/metrics`` and ``/debug/...`` (mesh/observability/admin.py; /debug/ only from and to loopback,
        or over HTTPS to the admin identity with ``tls``); returns the bound port (``port`` 0 picks a free one)."""
        self.admin = AdminServer(self.prometheus_registry, component="sluice-gateway", tls=tls)
        return self.admin.start(host, port)
