"""The one watch helper every component uses: list at R, watch from R+1, resume, resync.

aetcd's watch raises on disconnect (``ConnectionFailedError``) and after compaction
(``RevisionCompactedError``); :func:`watch_prefix` turns both into an endless, gap-free stream:

* first it lists the prefix and yields :class:`Resync` (``reason="initial"``) with every key;
* then it yields each :class:`~mesh.registry.etcd.client.KeyEvent` from revision R+1 on;
* after a disconnect it retries with backoff and resumes from the last revision it yielded;
* when that history was compacted it lists again and yields :class:`Resync` (``"compacted"``);
* when etcd came back without its data (wiped and restarted, restored from a backup: see
  :mod:`mesh.registry.etcd.epoch`) it lists again and yields :class:`Resync` (``"reset"``) instead of
  waiting for a revision the new cluster may reach much later, if ever.

Consumers replace their whole state with a resync's items.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from mesh.errors import EtcdError, RevisionCompactedError
from mesh.registry.etcd.backoff import Backoff
from mesh.registry.etcd.client import EtcdClient, KeyEvent, KeyValue
from mesh.registry.etcd.epoch import ClusterEpoch

log = structlog.get_logger("mesh.registry.etcd.watch")

ResyncReason = Literal["initial", "compacted", "reconnect", "reset"]


@dataclass(frozen=True)
class Resync:
    """The whole state under the prefix at ``revision``: replace, don't merge."""

    revision: int
    items: tuple[KeyValue, ...]
    reason: ResyncReason
    kind: Literal["resync"] = "resync"


WatchEvent = Resync | KeyEvent


async def watch_prefix(
    client: EtcdClient,
    prefix: str | bytes,
    *,
    resync_on_reconnect: bool = False,
    backoff: Backoff | None = None,
    on_connection: Callable[[bool, str | None], None] | None = None,
) -> AsyncGenerator[WatchEvent, None]:
    """Yield a :class:`Resync`, then every change under ``prefix``, forever (cancel or ``aclose`` to stop).

    ``resync_on_reconnect`` lists again after every disconnect instead of resuming (resuming is
    exact too; a resync just costs a full listing). ``on_connection(ok, error)`` is called when
    the connection to etcd is lost or back.
    """
    backoff = backoff or Backoff()
    epoch = ClusterEpoch()
    revision: int | None = None
    reason: ResyncReason = "initial"
    connected: bool | None = None

    def report(ok: bool, error: str | None) -> None:
        nonlocal connected
        if ok != connected:
            connected = ok
            if on_connection is not None:
                on_connection(ok, error)

    while True:
        try:
            if revision is None:
                snapshot = await client.get_prefix(prefix)
                report(True, None)
                backoff.reset()
                if snapshot.header is not None:
                    epoch.observe(snapshot.header)  # a fresh listing: whatever came before is replaced
                revision = snapshot.revision
                log.debug("etcd_watch_resync", prefix=_text(prefix), revision=revision, reason=reason,
                          keys=len(snapshot.items))
                yield Resync(snapshot.revision, snapshot.items, reason)
            elif not connected:
                # A cheap probe, so that "connected" is reported before any event, and so that a
                # cluster that lost its data is not watched from a revision it has not reached.
                header = await client.cluster_header()
                report(True, None)
                backoff.reset()
                problem = epoch.observe(header, revision)
                if problem is not None:
                    log.warning("etcd_cluster_reset", prefix=_text(prefix), revision=revision,
                                etcd_revision=header.revision, problem=problem, endpoint=header.endpoint)
                    revision, reason = None, "reset"
                    continue
                log.info("etcd_watch_resumed", prefix=_text(prefix), from_revision=revision + 1)
            async with contextlib.aclosing(client.watch(prefix, revision + 1)) as events:
                async for event in events:
                    revision = event.revision
                    yield event
        except RevisionCompactedError as exc:
            log.warning("etcd_watch_compacted", prefix=_text(prefix), revision=revision,
                        compacted_revision=exc.compacted_revision)
            revision, reason = None, "compacted"
        except EtcdError as exc:
            report(False, str(exc))
            delay = backoff.next_delay()
            log.warning("etcd_watch_interrupted", prefix=_text(prefix), revision=revision, error=str(exc),
                        retry_in=round(delay, 2))
            if resync_on_reconnect and revision is not None:
                revision, reason = None, "reconnect"
            await asyncio.sleep(delay)


def _text(prefix: str | bytes) -> str:
    return prefix.decode("utf-8", "replace") if isinstance(prefix, bytes) else prefix
