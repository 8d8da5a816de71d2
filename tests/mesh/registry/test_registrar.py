"""The Registrar against a real etcd: leases, deregistration, crashes, outages, lost leases, refused
records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, InstanceState
from mesh.registry.registrar import Registrar
from mesh.registry.settings import EtcdSettings
from tests.fixtures.etcd import EtcdServer
from tests.mesh.conftest import settings_for
from tests.mesh.helpers import eventually


def record(model: str = "iris", version: int = 1, instance_id: str = "inst-a", port: int = 8001,
           state: InstanceState = InstanceState.SERVING) -> InstanceRecord:
    return InstanceRecord(address=f"127.0.0.1:{port}", model=model, version=version, instance_id=instance_id,
                          state=state, started=1_700_000_000)


@pytest.fixture
async def registrars(settings: EtcdSettings) -> AsyncIterator[Callable[..., Registrar]]:
    """Make registrars that are closed (and their leases revoked) when the test ends."""
    made: list[Registrar] = []

    def make(custom: EtcdSettings | None = None, verify_interval: float = 30.0) -> Registrar:
        registrar = Registrar(custom or settings, verify_interval=verify_interval)
        made.append(registrar)
        return registrar

    yield make
    for registrar in made:
        await registrar.close()


async def keys_under(client: EtcdClient, prefix: str) -> dict[str, bytes]:
    snapshot = await client.get_prefix(prefix)
    return {kv.key.decode(): kv.value for kv in snapshot.items}


async def test_register_update_deregister(registrars: Callable[..., Registrar], client: EtcdClient,
                                          schema: KeySchema) -> None:
    registrar = registrars()
    await registrar.start()
    assert await registrar.wait_synced(10)
    assert await registrar.register(record(version=1))
    assert await registrar.register(record(version=2, port=8002))
    key1 = schema.instance("iris", 1, "inst-a")
    stored = await client.get(key1)
    assert stored is not None and stored.lease == registrar.state.lease_id
    assert InstanceRecord.from_json(stored.value) == record(version=1)

    assert await registrar.register(record(version=1, state=InstanceState.DRAINING))
    stored = await client.get(key1)
    assert stored is not None and json.loads(stored.value)["state"] == "draining"

    assert await registrar.deregister("iris", 1)
    assert set(await keys_under(client, schema.models_prefix)) == {schema.instance("iris", 2, "inst-a")}
    state = registrar.state
    assert state.connected and state.synced and state.registered == 1 and state.last_error is None


async def test_close_revokes_everything_at_once(registrars: Callable[..., Registrar], client: EtcdClient,
                                                schema: KeySchema) -> None:
    registrar = registrars()
    await registrar.start()
    assert await registrar.wait_synced(10)
    await registrar.register(record(model="a"))
    await registrar.register(record(model="b"))
    assert len(await keys_under(client, schema.models_prefix)) == 2
    await registrar.close(deregister=True)
    assert await keys_under(client, schema.models_prefix) == {}


@pytest.mark.slow
async def test_crash_leaves_keys_to_expire_with_the_lease(registrars: Callable[..., Registrar],
                                                          client: EtcdClient, schema: KeySchema) -> None:
    registrar = registrars()
    await registrar.start()
    assert await registrar.wait_synced(10)
    await registrar.register(record())
    await registrar.close(deregister=False)  # like SIGKILL: no revoke, keepalive just stops
    assert len(await keys_under(client, schema.models_prefix)) == 1

    async def gone() -> bool:
        return await keys_under(client, schema.models_prefix) == {}

    took = await eventually(gone, timeout=10, what="the instance key to expire with its lease")
    assert took < 2 * registrar.settings.lease_ttl + 2


async def test_start_never_blocks_when_etcd_is_down(etcd: EtcdServer) -> None:
    etcd.stop()
    registrar = Registrar(settings_for(etcd))
    try:
        with capture_logs() as logs:
            await registrar.start()  # returns at once
            assert await registrar.register(record()) is False
            await eventually(lambda: _true(registrar.state.last_error is not None), 5, "an error to show")
        assert not registrar.state.connected
        assert any(entry["event"] == "etcd_unavailable" for entry in logs)

        etcd.start()
        async with EtcdClient(settings_for(etcd)) as client:
            async def registered() -> bool:
                return await client.get(KeySchema().instance("iris", 1, "inst-a")) is not None

            await eventually(registered, timeout=10, what="the registration after etcd came up")
        # The key is visible in etcd a moment before the registrar has read etcd's answer to its
        # write and marked itself connected: wait for that, do not race it.
        await eventually(lambda: _true(registrar.state.connected), 5, "the registrar to report itself connected")
    finally:
        await registrar.close()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.slow
@pytest.mark.parametrize("down_for", [0.0, 5.0], ids=["short-outage", "outage-longer-than-ttl"])
async def test_outage_then_restart_restores_registrations_without_stale_entries(etcd: EtcdServer,
                                                                                down_for: float) -> None:
    settings = settings_for(etcd)
    schema = KeySchema(settings.prefix)
    registrar = Registrar(settings)
    try:
        await registrar.start()
        assert await registrar.wait_synced(10)
        await registrar.register(record(version=1))
        await registrar.register(record(version=2, port=8002))

        etcd.stop()
        await eventually(lambda: _true(not registrar.state.connected), 10, "the registrar to notice the outage")
        await registrar.deregister("iris", 1)  # while etcd is away
        await asyncio.sleep(down_for)
        etcd.start()

        async with EtcdClient(settings) as client:
            async def exactly_version_2() -> bool:
                return set(await keys_under(client, schema.models_prefix)) == {schema.instance("iris", 2, "inst-a")}

            took = await eventually(exactly_version_2, timeout=15, what="registrations to match after restart")
            assert took < settings.lease_ttl + 3
            # And it stays that way once old leases have had time to expire.
            await eventually(lambda: _true(registrar.state.synced), 10, "the registrar to report synced")
            stored = await client.get(schema.instance("iris", 2, "inst-a"))
            assert stored is not None and stored.lease == registrar.state.lease_id
    finally:
        await registrar.close()


@pytest.mark.slow
async def test_lost_lease_is_replaced_and_everything_rewritten(registrars: Callable[..., Registrar],
                                                               client: EtcdClient, schema: KeySchema) -> None:
    registrar = registrars()
    await registrar.start()
    assert await registrar.wait_synced(10)
    await registrar.register(record())
    old_lease = registrar.state.lease_id
    assert old_lease is not None
    with capture_logs() as logs:
        await client.revoke_lease(old_lease)  # as if it expired during a long pause
        assert await client.get(schema.instance("iris", 1, "inst-a")) is None

        async def back_under_new_lease() -> bool:
            kv = await client.get(schema.instance("iris", 1, "inst-a"))
            return kv is not None and kv.lease != old_lease and kv.lease == registrar.state.lease_id

        await eventually(back_under_new_lease, timeout=10, what="the record to come back under a new lease")
    assert any(entry["event"] == "etcd_lease_lost" for entry in logs)
    assert registrar.state.reconnects == 1


async def test_records_deleted_by_hand_are_restored(registrars: Callable[..., Registrar], client: EtcdClient,
                                                    schema: KeySchema) -> None:
    registrar = registrars(verify_interval=0.3)
    await registrar.start()
    assert await registrar.wait_synced(10)
    await registrar.register(record())
    key = schema.instance("iris", 1, "inst-a")
    await client.delete(key)

    async def restored() -> bool:
        return await client.get(key) is not None

    await eventually(restored, timeout=10, what="the registrar to restore a deleted record")


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd that refuses requests over 4 KiB ("request is too large"), so a refusal is cheap."""
    server = EtcdServer(tmp_path / "etcd-small", extra_args=("--max-request-bytes", "4096"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_a_record_etcd_refuses_does_not_block_the_others(small_etcd: EtcdServer) -> None:
    settings = settings_for(small_etcd, "/refused/")
    schema = KeySchema(settings.prefix)
    registrar = Registrar(settings)
    big = record(model="big").model_copy(update={"labels": {"note": "x" * 8192}})
    try:
        with capture_logs() as logs:
            await registrar.start()
            assert await registrar.wait_synced(10)
            assert not await registrar.register(big)  # refused: registering it does not succeed
            assert await registrar.register(record(model="good"))
            async with EtcdClient(settings) as client:
                assert set(await keys_under(client, schema.models_prefix)) == {schema.instance("good", 1, "inst-a")}
                # A change of the good record goes through too; the refused one is not retried meanwhile.
                assert await registrar.register(record(model="good", state=InstanceState.DRAINING))
                stored = await client.get(schema.instance("good", 1, "inst-a"))
                assert stored is not None and json.loads(stored.value)["state"] == "draining"
            await asyncio.sleep(3 * settings.lease_ttl)  # long enough for several lease round trips
        state = registrar.state
        assert state.connected and state.reconnects == 0 and state.last_error is None
        assert state.refused == (schema.instance("big", 1, "inst-a"),)
        events = [entry["event"] for entry in logs]
        assert "etcd_unavailable" not in events and events.count("etcd_lease_granted") == 1
        refusals = [entry for entry in logs if entry["event"] == "registry_record_refused"]
        assert len(refusals) == 1 and "request is too large" in refusals[0]["error"]
        assert refusals[0]["key"] == schema.instance("big", 1, "inst-a")

        # Deregistering it forgets the refusal.
        await registrar.deregister("big", 1)
        assert registrar.state.refused == ()
    finally:
        await registrar.close()
