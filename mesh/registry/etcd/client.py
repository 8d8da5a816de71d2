"""A typed asyncio etcd client: TLS, user/password, endpoint failover, errors from :mod:`mesh.errors`.

Keys may be given as ``str`` or ``bytes``; etcd stores bytes and :class:`KeyValue` holds bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import structlog

from mesh.errors import EtcdAuthError, EtcdUnavailableError, LeaseLostError, MeshError
from mesh.registry.etcd._aetcd import TlsClient, member_status, translate_error
from mesh.registry.settings import EtcdSettings, parse_endpoint

T = TypeVar("T")
log = structlog.get_logger("mesh.registry.etcd")

# gRPC's own reconnect backoff grows to 120 s; after an etcd restart we want to be back in ~1 s.
# Keepalive pings detect a dead peer that sent no FIN; etcd's server-side minimum interval is 5 s.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    # Subchannels are shared process-wide by default: a new client would inherit another's
    # reconnect backoff and fail with "connection refused" although etcd is back up.
    "grpc.use_local_subchannel_pool": 1,
}


async def with_timeout(aw: Awaitable[T], timeout: float) -> T:
    """Like ``asyncio.wait_for``, minus its Python 3.11 flaw: when the inner call finishes just as
    the caller is cancelled, ``wait_for`` returns the result and the cancellation is lost (a
    ``task.cancel()`` that never lands). Here cancellation always propagates."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise asyncio.TimeoutError
    return task.result()


def _key(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that starts with ``prefix``."""
    data = bytearray(prefix)
    for index in reversed(range(len(data))):
        if data[index] < 0xFF:
            data[index] += 1
            return bytes(data[: index + 1])
    return b"\0"


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_etcd(cls, kv: Any) -> KeyValue:
        return cls(bytes(kv.key), bytes(kv.value), int(kv.create_revision), int(kv.mod_revision),
                   int(kv.version), int(kv.lease))


@dataclass(frozen=True)
class ClusterHeader:
    """Who answered a call and as of when: the response header etcd puts on every reply."""

    cluster_id: int
    member_id: int
    revision: int
    raft_term: int
    endpoint: str
    """The endpoint the reply came from (member ids are per endpoint)."""

    @classmethod
    def from_etcd(cls, header: Any, endpoint: str) -> ClusterHeader:
        return cls(int(header.cluster_id), int(header.member_id), int(header.revision), int(header.raft_term),
                   endpoint)


@dataclass(frozen=True)
class Snapshot:
    """Every key under a prefix as of one revision."""

    revision: int
    items: tuple[KeyValue, ...]
    header: ClusterHeader | None = None
    """The listing's response header (None where a snapshot is built by hand)."""


@dataclass(frozen=True)
class KeyEvent:
    """A change of one key; for a delete, ``kv.value`` is empty and ``kv.mod_revision`` is the deletion's."""

    kind: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


class EtcdClient:
    """One session with etcd, built from :class:`EtcdSettings`.

    Endpoints are tried in order; when the current one becomes unreachable the next call goes to
    the next one. Every call is bounded by ``request_timeout``; errors are :class:`MeshError`\\ s.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._index = 0
        self._client: TlsClient | None = None
        self._credentials = self._make_credentials() if settings.use_tls else None

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self.settings.endpoints[self._index]

    def _make_credentials(self) -> grpc.ChannelCredentials:
        def read(path: Any) -> bytes | None:
            return None if path is None else bytes(path.read_bytes())

        try:
            return grpc.ssl_channel_credentials(root_certificates=read(self.settings.ca_cert),
                                                private_key=read(self.settings.key),
                                                certificate_chain=read(self.settings.cert))
        except OSError as exc:
            raise MeshError(f"cannot read etcd TLS file: {exc}") from exc

    def _new_client(self) -> TlsClient:
        host, port, _ = parse_endpoint(self.endpoint)
        password = self.settings.password.get_secret_value() if self.settings.password else None
        return TlsClient(credentials=self._credentials, host=host, port=port, username=self.settings.username,
                         password=password, timeout=self.settings.request_timeout,
                         options=dict(_CHANNEL_OPTIONS), connect_wait_timeout=self.settings.connect_timeout)

    async def _session(self) -> TlsClient:
        if self._client is None:
            client = self._new_client()
            try:
                await with_timeout(client.connect(), self.settings.connect_timeout)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await client.close()
                raise self._translate(exc) from exc
            self._client = client
        return self._client

    def _translate(self, exc: BaseException) -> BaseException:
        error = translate_error(exc, self.endpoint)
        return exc if error is None else error

    async def _drop_session(self, *, failover: bool) -> None:
        client, self._client = self._client, None
        if failover and len(self.settings.endpoints) > 1:
            self._index = (self._index + 1) % len(self.settings.endpoints)
            log.info("etcd_failover", endpoint=self.endpoint)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def _call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        try:
            client = await self._session()
            return await with_timeout(op(client), self.settings.request_timeout + 1)
        except Exception as exc:
            error = self._translate(exc)
            if isinstance(error, EtcdUnavailableError) and len(self.settings.endpoints) > 1:
                await self._drop_session(failover=True)
            elif isinstance(error, EtcdAuthError):
                # Auth tokens expire and die with an etcd restart: authenticate again next call.
                await self._drop_session(failover=False)
            raise error from exc

    async def connect(self) -> None:
        """Pick the first endpoint that answers within ``connect_timeout``, else raise EtcdUnavailableError."""
        problems = []
        for _ in self.settings.endpoints:
            try:
                await with_timeout(self.status(), self.settings.connect_timeout)
                return
            except EtcdUnavailableError as exc:
                problems.append(str(exc))  # _call has moved on to the next endpoint already
            except asyncio.TimeoutError:
                problems.append(f"etcd at {self.endpoint} did not answer within {self.settings.connect_timeout}s")
                await self._drop_session(failover=True)
        raise EtcdUnavailableError("; ".join(problems))

    async def close(self) -> None:
        await self._drop_session(failover=False)

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def status(self) -> str:
        """The etcd server version of the current endpoint."""
        status = await self._call(lambda c: c.status())
        return str(status.version)

    async def cluster_header(self) -> ClusterHeader:
        """The current endpoint's response header (cluster and member id, revision, raft term):
        one cheap call, for telling a restarted cluster from one that lost its data."""
        reply = await self._call(member_status)
        return ClusterHeader.from_etcd(reply.header, self.endpoint)

    async def get(self, key: str | bytes) -> KeyValue | None:
        result = await self._call(lambda c: c.get(_key(key)))
        return None if result is None else KeyValue.from_etcd(result)

    async def get_prefix(self, prefix: str | bytes) -> Snapshot:
        """Every key starting with ``prefix`` (sorted by key) and the revision they were read at."""
        result = await self._call(lambda c: c.get_prefix(_key(prefix), sort_order="ascend"))
        return Snapshot(int(result.header.revision), tuple(KeyValue.from_etcd(kv) for kv in result.kvs),
                        ClusterHeader.from_etcd(result.header, self.endpoint))

    async def newest_mod_revision(self, prefix: str | bytes) -> int:
        """The highest ``mod_revision`` of the keys under ``prefix`` (0 when there are none): the
        revision of the last write a watch on that prefix must have delivered (deletes aside)."""
        result = await self._call(lambda c: c.get_prefix(_key(prefix), sort_order="descend", sort_target="mod",
                                                         keys_only=True))
        return max((int(kv.mod_revision) for kv in result.kvs), default=0)

    async def put(self, key: str | bytes, value: bytes, *, lease: int | None = None) -> int:
        """Write ``key``; returns the revision of the write."""
        result = await self._call(lambda c: c.put(_key(key), value, lease=lease))
        return int(result.header.revision)

    async def delete(self, key: str | bytes) -> bool:
        """Delete ``key``; True if it existed."""
        result = await self._call(lambda c: c.delete(_key(key)))
        return result is not None

    async def delete_prefix(self, prefix: str | bytes) -> int:
        result = await self._call(lambda c: c.delete_prefix(_key(prefix)))
        return int(result.deleted) if result is not None else 0

    async def put_if_mod_revision(self, key: str | bytes, value: bytes, mod_revision: int, *,
                                  lease: int | None = None) -> tuple[bool, int, KeyValue | None]:
        """Compare-and-swap: write only if the key's mod_revision is still ``mod_revision`` (0: absent).
        ``lease``: the key lives as long as that lease (an election: create the key if absent).

        Returns (written, revision, current key-value when not written).
        """
        raw = _key(key)

        async def txn(client: Any) -> tuple[bool, Any]:
            tx = client.transactions
            result: tuple[bool, Any] = await client.transaction(
                compare=[tx.mod(raw) == mod_revision],
                success=[tx.put(raw, value, lease=lease)],
                failure=[tx.get(raw)],
            )
            return result

        succeeded, responses = await self._call(txn)
        if succeeded:
            return True, int(responses[0].response_put.header.revision), None
        current = responses[0][0][1] if responses and responses[0] else None
        if current is None:
            return False, 0, None
        return False, int(current.header.revision), KeyValue.from_etcd(current)

    async def delete_if_mod_revision(self, key: str | bytes, mod_revision: int) -> tuple[bool, int]:
        """Compare-and-delete: delete only if the key's mod_revision is still ``mod_revision``.

        Returns (deleted, revision of the delete; else the key's mod_revision now, 0 when absent).
        """
        raw = _key(key)

        async def txn(client: Any) -> tuple[bool, Any]:
            tx = client.transactions
            result: tuple[bool, Any] = await client.transaction(
                compare=[tx.mod(raw) == mod_revision],
                success=[tx.delete(raw)],
                failure=[tx.get(raw)],
            )
            return result

        succeeded, responses = await self._call(txn)
        if succeeded:
            return True, int(responses[0].response_delete_range.header.revision)
        current = responses[0][0][1] if responses and responses[0] else None
        return False, int(KeyValue.from_etcd(current).mod_revision) if current is not None else 0

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        lease = await self._call(lambda c: c.lease(ttl))
        return int(lease.id)

    async def refresh_lease(self, lease_id: int) -> int:
        """One keepalive; returns the lease's new TTL. Raises :class:`LeaseLostError` if it is gone."""
        reply = await self._call(lambda c: c.refresh_lease(lease_id))
        ttl = 0 if reply is None else int(reply.TTL)
        if ttl <= 0:
            raise LeaseLostError(f"lease {lease_id:x} expired or was revoked")
        return ttl

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, deleting every key attached to it (no error if it is already gone)."""
        try:
            await self._call(lambda c: c.revoke_lease(lease_id))
        except MeshError as exc:
            if "lease not found" not in str(exc):
                raise

    async def compact(self, revision: int) -> None:
        """Drop history below ``revision`` (watches from older revisions then need a resync)."""
        await self._call(lambda c: c.compact(revision, physical=True))

    async def watch(self, prefix: str | bytes, start_revision: int) -> AsyncGenerator[KeyEvent, None]:
        """Raw watch of a prefix from ``start_revision``: raises on disconnect or compaction.

        Use :func:`mesh.registry.etcd.watch_prefix` instead, which resumes and resyncs.
        """
        raw = _key(prefix)
        client = await self._session()
        try:
            watch = await with_timeout(
                client.watch(raw, range_end=prefix_range_end(raw), start_revision=start_revision),
                self.settings.request_timeout + 1,
            )
        except Exception as exc:
            raise self._translate(exc) from exc
        try:
            async for event in watch:
                yield KeyEvent("put" if event.kind == "PUT" else "delete", KeyValue.from_etcd(event.kv))
        except Exception as exc:
            error = self._translate(exc)
            if isinstance(error, EtcdUnavailableError) and len(self.settings.endpoints) > 1:
                await self._drop_session(failover=True)
            raise error from exc
        finally:
            with contextlib.suppress(Exception):
                await with_timeout(watch.cancel(), 1.0)
