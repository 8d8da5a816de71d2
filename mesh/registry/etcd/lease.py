"""Lease keepalive: aetcd grants leases but never refreshes them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from mesh.errors import EtcdError, LeaseLostError
from mesh.registry.etcd.client import EtcdClient

log = structlog.get_logger("mesh.registry.etcd.lease")


class LeaseKeepAlive:
    """Refreshes one lease every ``ttl / 3`` seconds until cancelled.

    :meth:`run` raises :class:`LeaseLostError` when etcd says the lease is gone, or when no refresh
    succeeded for a whole TTL (etcd may have expired it: assume the worst and start over).
    Transient failures are retried every second and reported through ``on_health(ok, error)``.
    """

    def __init__(self, client: EtcdClient, lease_id: int, ttl: int, *,
                 on_health: Callable[[bool, str | None], None] | None = None) -> None:
        self.client = client
        self.lease_id = lease_id
        self.ttl = ttl
        self.interval = max(0.5, ttl / 3)
        self.retry_interval = min(1.0, self.interval)
        self.last_refresh = time.monotonic()
        self._on_health = on_health

    def _report(self, ok: bool, error: str | None) -> None:
        if self._on_health is not None:
            self._on_health(ok, error)

    async def run(self) -> None:
        healthy = True
        while True:
            await asyncio.sleep(self.interval if healthy else self.retry_interval)
            try:
                await self.client.refresh_lease(self.lease_id)
            except LeaseLostError:
                log.warning("etcd_lease_lost", lease_id=f"{self.lease_id:x}", reason="expired")
                raise
            except EtcdError as exc:
                healthy = False
                self._report(False, str(exc))
                silent_for = time.monotonic() - self.last_refresh
                log.warning("etcd_lease_keepalive_failed", lease_id=f"{self.lease_id:x}", error=str(exc),
                            silent_for=round(silent_for, 1))
                if silent_for >= self.ttl:
                    raise LeaseLostError(
                        f"lease {self.lease_id:x}: no keepalive for {silent_for:.0f}s (TTL {self.ttl}s)"
                    ) from exc
                continue
            self.last_refresh = time.monotonic()
            if not healthy:
                log.info("etcd_lease_keepalive_recovered", lease_id=f"{self.lease_id:x}")
                healthy = True
            self._report(True, None)
