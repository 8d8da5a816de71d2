"""watch_prefix against a real etcd: initial listing, resume after a restart, resync after compaction
or after etcd lost its data."""

from __future__ import annotations

import contextlib

import pytest

from mesh.registry.etcd import Backoff, ClusterEpoch, ClusterHeader, EtcdClient, KeyEvent, Resync, watch_prefix
from tests.fixtures.etcd import EtcdServer
from tests.mesh.conftest import settings_for
from tests.mesh.helpers import next_event


async def test_lists_then_streams_changes(client: EtcdClient, etcd_prefix: str) -> None:
    await client.put(f"{etcd_prefix}a", b"1")
    await client.put("/unrelated/key", b"x")
    async with contextlib.aclosing(watch_prefix(client, etcd_prefix)) as events:
        first = await next_event(events)
        assert isinstance(first, Resync) and first.reason == "initial" and first.kind == "resync"
        assert [kv.key for kv in first.items] == [f"{etcd_prefix}a".encode()]
        revision = await client.put(f"{etcd_prefix}b", b"2")
        await client.delete(f"{etcd_prefix}a")
        put = await next_event(events)
        assert isinstance(put, KeyEvent) and put.kind == "put" and put.kv.value == b"2"
        assert put.revision == revision
        deleted = await next_event(events)
        assert isinstance(deleted, KeyEvent) and deleted.kind == "delete"
        assert deleted.kv.key == f"{etcd_prefix}a".encode() and deleted.revision > revision


@pytest.mark.slow
async def test_resumes_after_etcd_restart_without_gaps_or_duplicates(etcd: EtcdServer) -> None:
    connection: list[bool] = []
    async with EtcdClient(settings_for(etcd)) as client, contextlib.aclosing(
        watch_prefix(client, "/w/", backoff=Backoff(initial=0.1, maximum=0.5),
                     on_connection=lambda ok, _error: connection.append(ok))
    ) as events:
        assert isinstance(await next_event(events), Resync)
        await client.put("/w/a", b"1")
        first = await next_event(events)
        assert isinstance(first, KeyEvent) and first.kv.key == b"/w/a"

        etcd.stop()
        etcd.start()
        # Written after the restart but before the watcher is back: must arrive, once, in order.
        await client.put("/w/b", b"2")
        await client.put("/w/c", b"3")
        seen = [await next_event(events, timeout=20) for _ in range(2)]
        assert all(isinstance(e, KeyEvent) for e in seen)
        assert [e.kv.key for e in seen if isinstance(e, KeyEvent)] == [b"/w/b", b"/w/c"]
        assert connection[0] is True and False in connection and connection[-1] is True


async def test_resyncs_after_compaction(client: EtcdClient, etcd_prefix: str) -> None:
    await client.put(f"{etcd_prefix}a", b"1")
    async with contextlib.aclosing(watch_prefix(client, etcd_prefix)) as events:
        initial = await next_event(events)
        assert isinstance(initial, Resync)
        # The generator is parked after the listing, before it opens the watch at R+1: make that
        # history disappear first.
        await client.delete(f"{etcd_prefix}a")
        latest = await client.put(f"{etcd_prefix}b", b"2")
        await client.compact(latest)
        resync = await next_event(events)
        assert isinstance(resync, Resync) and resync.reason == "compacted"
        assert resync.revision >= latest
        assert [(kv.key, kv.value) for kv in resync.items] == [(f"{etcd_prefix}b".encode(), b"2")]
        await client.put(f"{etcd_prefix}c", b"3")
        after = await next_event(events)
        assert isinstance(after, KeyEvent) and after.kv.key == f"{etcd_prefix}c".encode()


@pytest.mark.slow
async def test_resync_on_reconnect_mode(etcd: EtcdServer) -> None:
    async with EtcdClient(settings_for(etcd)) as client, contextlib.aclosing(
        watch_prefix(client, "/r/", resync_on_reconnect=True, backoff=Backoff(initial=0.1, maximum=0.5))
    ) as events:
        assert isinstance(await next_event(events), Resync)
        await client.put("/r/a", b"1")
        assert isinstance(await next_event(events), KeyEvent)
        etcd.stop()
        etcd.start()
        again = await next_event(events, timeout=20)
        assert isinstance(again, Resync) and again.reason == "reconnect"
        assert [kv.key for kv in again.items] == [b"/r/a"]


@pytest.mark.slow
async def test_resyncs_when_etcd_comes_back_without_its_data(etcd: EtcdServer) -> None:
    """Wiped and restarted on the same port: the new etcd is at a lower revision than the watch.

    Resuming would wait for a revision the new cluster reaches much later; the watch lists again.
    """
    async with EtcdClient(settings_for(etcd)) as client, contextlib.aclosing(
        watch_prefix(client, "/z/", backoff=Backoff(initial=0.1, maximum=0.5))
    ) as events:
        assert isinstance(await next_event(events), Resync)
        for index in range(10):  # the old cluster's revision, well above what the new one reaches
            await client.put(f"/z/old-{index}", b"1")
        for _ in range(10):
            assert isinstance(await next_event(events), KeyEvent)

        etcd.wipe_and_restart()
        await client.put("/z/after", b"2")
        reset = await next_event(events, timeout=20)
        assert isinstance(reset, Resync) and reset.reason == "reset"
        assert [kv.key for kv in reset.items] == [b"/z/after"]
        await client.put("/z/later", b"3")
        later = await next_event(events)
        assert isinstance(later, KeyEvent) and later.kv.key == b"/z/later"


def _header(revision: int, *, term: int = 2, cluster: int = 1, member: int = 7,
            endpoint: str = "127.0.0.1:2379") -> ClusterHeader:
    return ClusterHeader(cluster, member, revision, term, endpoint)


def test_cluster_epoch_tells_a_wiped_cluster_from_a_restarted_one() -> None:
    epoch = ClusterEpoch()
    assert epoch.observe(_header(5)) is None
    assert epoch.observe(_header(5, term=3), seen_revision=5) is None  # restarted: new term, same data
    assert epoch.observe(_header(9, term=3)) is None
    assert epoch.observe(_header(4, term=3)) == "revision went back from 9 to 4"
    assert epoch.observe(_header(6, term=3)) is None  # starts over from the alarm
    assert epoch.observe(_header(7, term=3), seen_revision=12) == "revision went back from 12 to 7"
    assert epoch.observe(_header(20, term=2)) == "raft term went back from 3 to 2"
    assert epoch.observe(_header(21, cluster=2)) == "cluster id changed from 1 to 2"
    # Another member of the same cluster behind one address (a load balancer, a replaced member
    # that caught up) is not a lost cluster; another endpoint has its own member too.
    assert epoch.observe(_header(22, cluster=2, member=8)) is None
    assert epoch.observe(_header(23, cluster=2, member=9, endpoint="127.0.0.1:2380")) is None
