"""The controller loop against a real etcd: rounds per change, debounce, status keys skipped,
periodic passes, the reset grace."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mesh.control import Changes, ControlLoop
from mesh.registry.etcd import EtcdClient, Resync
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, StatusDocument
from mesh.registry.state import RegistryState
from tests.mesh.helpers import eventually


class Rounds:
    """A reconcile that records each round."""

    def __init__(self) -> None:
        self.seen: list[tuple[RegistryState, Changes]] = []

    async def __call__(self, state: RegistryState, changes: Changes) -> None:
        self.seen.append((state, changes))


async def register(client: EtcdClient, schema: KeySchema, model: str, version: int = 1) -> None:
    record = InstanceRecord(address="127.0.0.1:7001", model=model, version=version, instance_id="a")
    await client.put(schema.instance(model, version, "a"), record.to_json())


@contextlib.asynccontextmanager
async def running(loop: ControlLoop, rounds: Rounds) -> AsyncIterator[None]:
    task = asyncio.create_task(loop.run(rounds))
    try:
        await eventually(lambda: _true(bool(rounds.seen)), 10, "the first round (after the listing)")
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.timeout(30)
async def test_a_burst_is_one_round_and_status_writes_none(client: EtcdClient, schema: KeySchema) -> None:
    loop = ControlLoop(client, schema, controller="test", debounce=0.2)
    rounds = Rounds()
    async with running(loop, rounds):
        assert rounds.seen[0][1].everything  # the listing: every model
        for model in ("iris", "mlp", "iris"):
            await register(client, schema, model)
        await eventually(lambda: _true(len(rounds.seen) >= 2), 10, "a round for the burst")
        await asyncio.sleep(0.4)
        assert len(rounds.seen) == 2
        state, changes = rounds.seen[1]
        assert changes.models == {"iris", "mlp"} and not changes.everything and changes.since is not None
        assert set(state.models) == {"iris", "mlp"}

        await client.put(schema.status("iris"), b'{"effective_weights": {"1": 100}}')
        await asyncio.sleep(0.5)
        assert len(rounds.seen) == 2  # a controller's own status write is no reason for a round
        assert loop.state is not None and loop.state.models["iris"].status is not None

        loop.request(["mlp"])
        await eventually(lambda: _true(len(rounds.seen) == 3), 10, "the requested round")
        assert rounds.seen[2][1].models == {"mlp"} and rounds.seen[2][1].since is None


@pytest.mark.timeout(30)
async def test_periodic_passes_cover_every_model(client: EtcdClient, schema: KeySchema) -> None:
    loop = ControlLoop(client, schema, controller="test", debounce=0.0, resync_interval=0.2)
    rounds = Rounds()
    async with running(loop, rounds):
        await eventually(lambda: _true(len(rounds.seen) >= 3), 10, "periodic rounds")
        assert all(changes.everything and changes.includes("anything") for _, changes in rounds.seen)


@pytest.mark.timeout(30)
async def test_after_a_reset_the_old_models_are_held_for_the_grace(client: EtcdClient, schema: KeySchema) -> None:
    loop = ControlLoop(client, schema, controller="test", debounce=0.0, reset_grace=0.5)
    rounds = Rounds()
    await register(client, schema, "iris")
    await loop.status.write({"iris": StatusDocument(effective_weights={1: 100})}, None)
    async with running(loop, rounds):
        assert set(loop.status.written) == {"iris"}
        # What watch_prefix yields when etcd came back without its data (nothing is written after).
        loop._resync(Resync(1, (), "reset"))
        loop.request()
        assert loop.status.written == {}  # written again rather than trusted
        await eventually(lambda: _true(len(rounds.seen) >= 2), 10, "a round after the reset")
        assert set(rounds.seen[-1][0].models) == {"iris"}  # held: the new etcd lacks it
        await eventually(lambda: _true(len(rounds.seen) >= 3), 10, "the round when the grace is over")
        assert rounds.seen[-1][0].models == {} and loop.view() is loop.state


async def _true(value: bool) -> bool:
    return value
