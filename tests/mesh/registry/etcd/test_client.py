"""The typed etcd client against a real etcd: reads, writes, CAS, leases, TLS, auth, failover."""

from __future__ import annotations

import time

import pytest

from mesh.errors import EtcdAuthError, EtcdUnavailableError, LeaseLostError
from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.settings import EtcdSettings
from tests.fixtures.etcd import EtcdServer
from tests.mesh.conftest import settings_for


async def test_put_get_list_delete(client: EtcdClient, etcd_prefix: str) -> None:
    first = await client.put(f"{etcd_prefix}a", b"1")
    await client.put(f"{etcd_prefix}b", b"2")
    kv = await client.get(f"{etcd_prefix}a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == first
    snapshot = await client.get_prefix(etcd_prefix)
    assert [item.key for item in snapshot.items] == [f"{etcd_prefix}a".encode(), f"{etcd_prefix}b".encode()]
    assert snapshot.revision >= first
    assert await client.delete(f"{etcd_prefix}a")
    assert not await client.delete(f"{etcd_prefix}a")
    assert await client.get(f"{etcd_prefix}a") is None
    assert await client.delete_prefix(etcd_prefix) == 1


async def test_compare_and_swap(client: EtcdClient, etcd_prefix: str) -> None:
    key = f"{etcd_prefix}cas"
    written, revision, _ = await client.put_if_mod_revision(key, b"v1", 0)  # 0: must not exist
    assert written
    written, _, current = await client.put_if_mod_revision(key, b"v2", 0)
    assert not written and current is not None and current.value == b"v1" and current.mod_revision == revision
    written, _, _ = await client.put_if_mod_revision(key, b"v2", revision)
    assert written
    kv = await client.get(key)
    assert kv is not None and kv.value == b"v2"


async def test_lease_refresh_and_revoke(client: EtcdClient, etcd_prefix: str) -> None:
    lease = await client.grant_lease(5)
    await client.put(f"{etcd_prefix}leased", b"x", lease=lease)
    assert 0 < await client.refresh_lease(lease) <= 5
    await client.revoke_lease(lease)
    assert await client.get(f"{etcd_prefix}leased") is None
    with pytest.raises(LeaseLostError):
        await client.refresh_lease(lease)
    await client.revoke_lease(lease)  # already gone: not an error


async def test_unreachable_etcd_fails_fast_with_a_clear_error() -> None:
    port = free_port()
    client = EtcdClient(EtcdSettings(endpoints=[f"127.0.0.1:{port}"], connect_timeout=2, request_timeout=2))
    start = time.monotonic()
    with pytest.raises(EtcdUnavailableError, match=f"127.0.0.1:{port} is unreachable"):
        await client.connect()
    assert time.monotonic() - start < 5
    await client.close()


async def test_failover_to_the_next_endpoint(shared_etcd: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    client = EtcdClient(EtcdSettings(endpoints=[dead, shared_etcd.endpoint], connect_timeout=2,
                                     request_timeout=2))
    try:
        await client.connect()
        assert client.endpoint == shared_etcd.endpoint
        assert await client.status()
    finally:
        await client.close()


@pytest.mark.slow
async def test_tls_with_client_certificates(etcd_tls: EtcdServer) -> None:
    tls = etcd_tls.tls
    assert tls is not None
    settings = settings_for(etcd_tls, ca_cert=tls.ca_cert, cert=tls.client_cert, key=tls.client_key)
    async with EtcdClient(settings) as client:
        await client.put("/tls/probe", b"ok")
        kv = await client.get("/tls/probe")
        assert kv is not None and kv.value == b"ok"
    # Plain text against a TLS port, or TLS without a client certificate, never connects.
    for bad in (settings_for(etcd_tls), settings_for(etcd_tls, ca_cert=tls.ca_cert)):
        client = EtcdClient(bad)
        with pytest.raises(EtcdUnavailableError):
            await client.connect()
        await client.close()


@pytest.mark.slow
async def test_username_and_password(etcd: EtcdServer) -> None:
    etcd.etcdctl("user", "add", "root:rootpw")
    etcd.etcdctl("auth", "enable")
    async with EtcdClient(settings_for(etcd, username="root", password="rootpw")) as client:
        await client.put("/auth/probe", b"ok")
        assert await client.get("/auth/probe") is not None
    client = EtcdClient(settings_for(etcd, username="root", password="wrong"))
    with pytest.raises(EtcdAuthError, match="refused the credentials"):
        await client.connect()
    await client.close()


async def test_newest_mod_revision_of_a_prefix(client: EtcdClient, etcd_prefix: str) -> None:
    assert await client.newest_mod_revision(f"{etcd_prefix}none/") == 0
    first = await client.put(f"{etcd_prefix}m/a", b"1")
    second = await client.put(f"{etcd_prefix}m/b", b"2")
    await client.put(f"{etcd_prefix}other", b"3")  # outside the prefix: not counted
    assert await client.newest_mod_revision(f"{etcd_prefix}m/") == second > first
    third = await client.put(f"{etcd_prefix}m/a", b"4")
    assert await client.newest_mod_revision(f"{etcd_prefix}m/") == third
