"""Write side for model services: keep this process's instance records in etcd under one lease.

The registrar holds the *desired* set of records and reconciles etcd to it in a background task:
after an etcd outage or a lost lease it grants a new lease, writes everything again, deletes
what was deregistered meanwhile and revokes the old lease, so no stale entry survives. Serving
never waits for etcd: :meth:`Registrar.start` returns at once and retries in the background.

Only connection trouble counts as an outage. A record etcd refuses for what it carries ("request
is too large", see :class:`~mesh.errors.EtcdRefusedError`) is logged once, left out and tried
again when it changes or under the next lease; the other records are registered as usual. An
etcd that came back without its data (see :mod:`mesh.registry.etcd.epoch`) is treated as a lost lease:
everything is registered again under a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from mesh.errors import EtcdError, EtcdRefusedError, LeaseLostError
from mesh.protocol import clip
from mesh.registry.etcd.backoff import Backoff
from mesh.registry.etcd.client import EtcdClient, with_timeout
from mesh.registry.etcd.epoch import ClusterEpoch
from mesh.registry.etcd.lease import LeaseKeepAlive
from mesh.registry.keys import KeySchema, validate_model_name, validate_version
from mesh.registry.records import InstanceRecord
from mesh.registry.settings import EtcdSettings

log = structlog.get_logger("mesh.registry.registrar")


@dataclass(frozen=True)
class RegistrarState:
    """A snapshot for status pages and metrics."""

    connected: bool
    """etcd reachable and the lease alive."""
    lease_id: int | None
    registered: int
    """Records this process wants registered."""
    synced: bool
    """etcd holds exactly the desired records (as far as this process knows)."""
    last_error: str | None
    last_error_at: float | None
    """Unix time of ``last_error``."""
    reconnects: int
    """Leases granted after the first one."""
    refused: tuple[str, ...] = ()
    """Keys of desired records etcd refused (too large, …): not registered, the reason is logged."""


class Registrar:
    """One lease per process; instance records registered under it and kept there.

    ``verify_interval`` seconds apart it re-reads its keys and rewrites any that someone deleted
    or changed (e.g. ``etcdctl del``).
    """

    def __init__(self, settings: EtcdSettings, *, client: EtcdClient | None = None,
                 verify_interval: float = 30.0) -> None:
        self.settings = settings
        self.schema = KeySchema(settings.prefix)
        self._client = client or EtcdClient(settings)
        self._owns_client = client is None
        self._verify_interval = verify_interval
        self._desired: dict[str, bytes] = {}
        self._records: dict[str, InstanceRecord] = {}
        self._written: dict[str, bytes] = {}  # what etcd may hold from us, under any of our leases
        self._refused: dict[str, bytes] = {}  # key → the value etcd refused for it
        self._epoch = ClusterEpoch()
        self._lease_id: int | None = None
        self._connected = False
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._reconnects = -1
        self._generation = 0
        self._synced_generation = -1
        self._wake = asyncio.Event()
        self._sync_done = asyncio.Event()  # set (and replaced) after every completed sync
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._verify_pending = False

    @property
    def state(self) -> RegistrarState:
        return RegistrarState(
            connected=self._connected,
            lease_id=self._lease_id,
            registered=len(self._desired),
            synced=self._connected and self._synced_generation == self._generation,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            reconnects=max(0, self._reconnects),
            refused=tuple(sorted(self._refused)),
        )

    @property
    def records(self) -> list[InstanceRecord]:
        """The desired records."""
        return list(self._records.values())

    async def start(self) -> None:
        """Start the background reconciler; returns immediately even when etcd is down."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="sluice-registrar")

    async def register(self, record: InstanceRecord, *, wait: float | None = None) -> bool:
        """Register (or update) ``record``; True once etcd holds it.

        Waits at most ``wait`` seconds (default ``request_timeout``; 0 = don't wait), and not at
        all while etcd is unreachable: the record is written as soon as etcd is back.
        """
        key = self.schema.instance(record.model, record.version, record.instance_id)
        self._desired[key] = record.to_json()
        self._records[key] = record
        log.info("registry_register", model=record.model, version=record.version,
                 instance_id=record.instance_id, address=record.address)
        return await self._changed(wait) and key not in self._refused

    async def deregister(self, model: str, version: int, *, wait: float | None = None) -> bool:
        """Remove this process's records of ``model`` ``version``; True once etcd no longer holds them."""
        prefix = self.schema.instances_prefix(validate_model_name(model), validate_version(version))
        for key in [k for k in self._desired if k.startswith(prefix)]:
            del self._desired[key]
            del self._records[key]
        log.info("registry_deregister", model=model, version=version)
        return await self._changed(wait)

    async def wait_synced(self, timeout: float) -> bool:
        """Wait until etcd holds exactly the desired records; False after ``timeout`` seconds."""
        target = self._generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._synced_generation < target:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await with_timeout(self._sync_done.wait(), remaining)
        return True

    async def close(self, deregister: bool = True) -> None:
        """Stop. ``deregister=True`` revokes the lease (all records vanish at once); ``False`` leaves
        them to expire after the TTL, like a crashed process would."""
        self._closing = True
        if self._task is not None:
            # Cancel until it lands: a cancellation can be swallowed by a call finishing at the
            # same moment (asyncio.wait_for in aetcd and grpc on Python 3.11).
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                self._task.result()
            self._task = None
        if deregister and self._lease_id is not None:
            try:
                await with_timeout(self._client.revoke_lease(self._lease_id), self.settings.request_timeout)
                log.info("etcd_lease_revoked", lease_id=f"{self._lease_id:x}")
            except (EtcdError, asyncio.TimeoutError) as exc:
                log.warning("etcd_lease_revoke_failed", lease_id=f"{self._lease_id:x}", error=str(exc))
        self._lease_id = None
        self._connected = False
        if self._owns_client:
            await self._client.close()

    async def _changed(self, wait: float | None) -> bool:
        self._generation += 1
        self._wake.set()
        timeout = self.settings.request_timeout if wait is None else wait
        if not self._connected or timeout <= 0:
            return False
        return await self.wait_synced(timeout)

    def _set_error(self, error: str) -> None:
        self._connected = False
        self._last_error = error
        self._last_error_at = time.time()

    def _on_keepalive(self, ok: bool, error: str | None) -> None:
        if ok:
            if not self._connected:
                # Back after an outage the lease survived: check nothing was lost meanwhile.
                log.info("etcd_reconnected", lease_id=f"{self._lease_id or 0:x}")
                self._verify_pending = True
                self._wake.set()
            self._connected = True
        elif error is not None:
            self._set_error(error)

    async def _run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=min(5.0, self.settings.lease_ttl / 2))
        while not self._closing:
            try:
                await self._session(backoff)
            except (EtcdError, asyncio.TimeoutError) as exc:
                error = str(exc) or "etcd did not answer in time"
                self._set_error(error)
                delay = backoff.next_delay()
                event = ("etcd_lease_lost" if isinstance(exc, LeaseLostError)
                         else "etcd_refused" if isinstance(exc, EtcdRefusedError) else "etcd_unavailable")
                log.warning(event, error=error, retry_in=round(delay, 2))
                await asyncio.sleep(delay)

    async def _session(self, backoff: Backoff) -> None:
        """One lease's lifetime: grant, write everything, keep alive and reconcile until it fails."""
        old_lease = self._lease_id
        lease_id = await self._client.grant_lease(self.settings.lease_ttl)
        self._lease_id = lease_id
        self._reconnects += 1
        log.info("etcd_lease_granted", lease_id=f"{lease_id:x}", ttl=self.settings.lease_ttl,
                 endpoint=self._client.endpoint, reconnect=self._reconnects > 0)
        # Everything is written again under this lease: whatever the cluster did before is moot.
        self._epoch.observe(await self._client.cluster_header())
        keepalive = asyncio.create_task(
            LeaseKeepAlive(self._client, lease_id, self.settings.lease_ttl, on_health=self._on_keepalive).run(),
            name="sluice-lease-keepalive",
        )
        try:
            # Everything goes again under the new lease; then the old lease (and whatever was
            # deregistered while etcd was away, still attached to it) can go.
            await self._sync(lease_id, rewrite=True)
            self._connected = True
            backoff.reset()
            if old_lease is not None and old_lease != lease_id:
                with contextlib.suppress(EtcdError, asyncio.TimeoutError):
                    await self._client.revoke_lease(old_lease)
            while not self._closing:
                woken = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait({keepalive, woken}, timeout=self._verify_interval,
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if keepalive in done:
                    keepalive.result()  # raises LeaseLostError
                    raise LeaseLostError(f"lease {lease_id:x} keepalive stopped")
                verify, self._verify_pending = self._verify_pending or not done, False
                if verify:
                    problem = self._epoch.observe(await self._client.cluster_header())
                    if problem is not None:
                        log.warning("etcd_cluster_reset", problem=problem, lease_id=f"{lease_id:x}")
                        raise LeaseLostError(f"etcd lost its data ({problem}): registering again")
                await self._sync(lease_id, rewrite=False, verify=verify)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await keepalive

    async def _sync(self, lease_id: int, *, rewrite: bool, verify: bool = False) -> None:
        """Make etcd hold exactly the desired records under ``lease_id``."""
        self._wake.clear()
        generation = self._generation
        desired = dict(self._desired)
        for key in [k for k in self._written if k not in desired]:
            await self._client.delete(key)
            del self._written[key]
        for key in [k for k in self._refused if k not in desired]:
            del self._refused[key]
        for key, value in desired.items():
            refused = self._refused.get(key) == value
            if refused and not rewrite:
                continue  # refused as it is: again when it changes, or under the next lease
            if verify and not rewrite:
                current = await self._client.get(key)
                if current is None or current.value != value or current.lease != lease_id:
                    log.warning("registry_record_restored", key=key)
                    self._written.pop(key, None)
            if rewrite or self._written.get(key) != value:
                try:
                    await self._client.put(key, value, lease=lease_id)
                except EtcdRefusedError as exc:
                    # This record only: the connection is fine and the others go on. What etcd
                    # may still hold of an earlier value stays in _written, so it is deleted later.
                    if not refused:
                        log.error("registry_record_refused", key=clip(key), bytes=len(value),
                                  error=clip(str(exc), 300))
                    self._refused[key] = value
                    continue
                if key in self._refused:
                    del self._refused[key]
                    log.info("registry_record_accepted", key=clip(key))
                self._written[key] = value
        self._synced_generation = generation
        self._sync_done.set()
        self._sync_done = asyncio.Event()
