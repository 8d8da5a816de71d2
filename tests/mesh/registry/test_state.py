"""RegistryState (pure) and set_weights (compare-and-swap against a real etcd)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mesh.errors import ConflictError, InvalidDocumentError
from mesh.registry.etcd import EtcdClient, KeyEvent, KeyValue, Resync, watch_prefix
from mesh.registry.keys import KeySchema
from mesh.registry.records import AccessRule, InstanceRecord, InstanceState, RoutingDocument, StatusDocument
from mesh.registry.state import (
    ModelState,
    apply_event,
    build_state,
    delete_routing,
    get_routing,
    keep_missing,
    load_state,
    promote,
    resolve_weights,
    set_weights,
)
from tests.mesh.helpers import next_event

SCHEMA = KeySchema("/s/")


def kv(key: str, value: bytes, revision: int = 1) -> KeyValue:
    return KeyValue(key.encode(), value, revision, revision, 1, 0)


def instance(model: str, version: int, instance_id: str, state: str = "serving") -> bytes:
    return InstanceRecord(address="127.0.0.1:9000", model=model, version=version, instance_id=instance_id,
                          state=InstanceState(state)).to_json()


def test_keep_missing_adds_what_the_new_state_lacks_and_lets_the_new_state_win() -> None:
    before = build_state(SCHEMA, 40, [
        kv("/s/models/iris/instances/1/a", instance("iris", 1, "a")),
        kv("/s/models/iris/instances/2/b", instance("iris", 2, "b")),
        kv("/s/models/iris/routing", RoutingDocument.from_weights({1: 90, 2: 10}).to_json()),
        kv("/s/models/mlp/instances/1/m", instance("mlp", 1, "m")),
    ])
    after = build_state(SCHEMA, 3, [  # an etcd that lost its data: one service back so far
        kv("/s/models/iris/instances/2/b", instance("iris", 2, "b", "draining")),
        kv("/s/models/iris/instances/3/c", instance("iris", 3, "c")),
    ])
    shown = keep_missing(after, before)
    assert shown.revision == 3 and set(shown.models) == {"iris", "mlp"}
    iris = shown.models["iris"]
    assert {v: set(r) for v, r in iris.instances.items()} == {1: {"a"}, 2: {"b"}, 3: {"c"}}
    assert iris.instances[2]["b"].state is InstanceState.DRAINING  # the new record wins
    assert iris.routing is not None and iris.routing.weights == {1: 90, 2: 10}
    assert shown.models["mlp"] == before.models["mlp"]
    assert keep_missing(after, build_state(SCHEMA, 0, [])) == after


def test_build_state_sorts_everything_into_models() -> None:
    state = build_state(SCHEMA, 10, [
        kv("/s/models/iris/instances/1/a", instance("iris", 1, "a")),
        kv("/s/models/iris/instances/2/b", instance("iris", 2, "b", "draining")),
        kv("/s/models/iris/routing", b'{"weights": {"1": 9, "2": 1}}', revision=7),
        kv("/s/models/iris/status", StatusDocument(effective_weights={1: 9, 2: 1}).to_json()),
        kv("/s/models/bert/routing", b'{"weights": {"1": -1}}'),
        kv("/s/models/bert/instances/1/x", b"not json"),
        kv("/s/models/bert/instances/1/y", instance("other", 1, "y")),
        kv("/s/models/odd-key", b""),
    ])
    assert state.revision == 10
    iris = state.models["iris"]
    assert iris.versions() == [1, 2]
    assert iris.serving_versions() == [1]
    assert iris.routing == RoutingDocument.from_weights({1: 9, 2: 1})
    assert iris.routing_revision == 7
    assert iris.status is not None and iris.status.effective_weights == {1: 9, 2: 1}
    bert = state.models["bert"]
    assert bert.routing is None and bert.routing_error is not None and "weights" in bert.routing_error
    assert bert.instances == {}
    assert len(bert.problems) == 2 and "not its key" in bert.problems[1]
    assert list(state.unknown_keys) == [b"/s/models/odd-key"]


def test_apply_events_matches_a_fresh_listing() -> None:
    items = [kv("/s/models/iris/instances/1/a", instance("iris", 1, "a"))]
    state = build_state(SCHEMA, 1, items)
    added = KeyValue(b"/s/models/iris/instances/2/b", instance("iris", 2, "b"), 2, 2, 1, 0)
    state = apply_event(state, KeyEvent("put", added))
    assert state.models["iris"].versions() == [1, 2] and state.revision == 2
    state = state.apply(KeyEvent("delete", KeyValue(b"/s/models/iris/instances/1/a", b"", 1, 3, 0, 0)))
    assert state.models["iris"].versions() == [2]
    assert state.models == build_state(SCHEMA, 3, [added]).models
    state = state.apply(KeyEvent("delete", KeyValue(added.key, b"", 2, 4, 0, 0)))
    assert state.models == {} and state.revision == 4
    state = state.apply(Resync(9, (kv("/s/models/m/routing", b'{"weights": {"3": 1}}'),), "compacted"))
    assert list(state.models) == ["m"] and state.revision == 9


def test_states_are_immutable_values() -> None:
    before = build_state(SCHEMA, 1, [kv("/s/models/iris/instances/1/a", instance("iris", 1, "a"))])
    after = before.apply(KeyEvent("put", kv("/s/models/iris/instances/2/b", instance("iris", 2, "b"), 2)))
    assert before.models["iris"].versions() == [1]
    assert after.models["iris"].versions() == [1, 2]
    with pytest.raises(TypeError):
        before.models["x"] = before.models["iris"]  # type: ignore[index]


def model_with(serving: list[int], routing: RoutingDocument | None = None,
               draining: tuple[int, ...] = ()) -> ModelState:
    instances = {}
    for version in [*serving, *draining]:
        state = InstanceState.DRAINING if version in draining else InstanceState.SERVING
        instances[version] = {"i": InstanceRecord(address="h:1", model="m", version=version, instance_id="i",
                                                  state=state)}
    return ModelState(name="m", instances=instances, routing=routing)


def test_resolve_weights_rules() -> None:
    # No routing document: the newest serving version takes everything.
    assert resolve_weights(model_with([1, 2])).weights == {2: 100}
    assert resolve_weights(model_with([1], draining=(2,))).weights == {1: 100}
    # Weighted versions without instances are dropped, with a warning.
    plan = resolve_weights(model_with([1], RoutingDocument.from_weights({1: 90, 3: 10})))
    assert plan.weights == {1: 90} and "version 3 has weight 10" in plan.warnings[0]
    # Nothing weighted is serving: default_version, else the newest serving version.
    routing = RoutingDocument.from_weights({5: 1}, default_version=1)
    assert resolve_weights(model_with([1, 2], routing)).weights == {1: 100}
    assert resolve_weights(model_with([1, 2], RoutingDocument.from_weights({5: 1}))).weights == {2: 100}
    # No instances at all.
    assert resolve_weights(model_with([], RoutingDocument.from_weights({1: 1}))).errors


async def test_set_weights_writes_and_reports_before_and_after(client: EtcdClient, schema: KeySchema) -> None:
    first = await set_weights(client, schema, "iris", {1: 100}, sticky_header="x-user")
    assert first.before is None and first.after.weights == {1: 100}
    second = await set_weights(client, schema, "iris", {"1": 90, "2": 10})
    assert second.before == first.after
    assert second.after.sticky_header == "x-user"  # kept unless given
    routing, revision = await get_routing(client, schema, "iris")
    assert routing == second.after and revision == second.revision
    third = await promote(client, schema, "iris", 2)
    assert third.after.weights == {2: 100}
    cleared = await set_weights(client, schema, "iris", {2: 1}, sticky_header="")
    assert cleared.after.sticky_header is None


async def test_set_weights_refuses_a_stale_revision(client: EtcdClient, schema: KeySchema) -> None:
    seen = await set_weights(client, schema, "iris", {1: 100})
    await set_weights(client, schema, "iris", {1: 50, 2: 50})  # another operator
    with pytest.raises(ConflictError, match="not the expected"):
        await set_weights(client, schema, "iris", {1: 10, 2: 90}, expected_revision=seen.revision)
    with pytest.raises(ConflictError):
        await set_weights(client, schema, "new-model", {1: 1}, expected_revision=5)  # absent is revision 0
    routing, _ = await get_routing(client, schema, "iris")
    assert routing is not None and routing.weights == {1: 50, 2: 50}


async def test_concurrent_writers_never_silently_overwrite(client: EtcdClient, schema: KeySchema) -> None:
    await set_weights(client, schema, "iris", {1: 100})
    results = await asyncio.gather(*(set_weights(client, schema, "iris", {1: 100 - n, 2: n}) for n in range(1, 9)),
                                   return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert winners and all(isinstance(e, ConflictError) for e in losers)
    # Every successful write saw the one before it: the chain of before → after is unbroken.
    final, _ = await get_routing(client, schema, "iris")
    assert final in [w.after for w in winners]


async def test_invalid_weights_are_rejected_before_writing(client: EtcdClient, schema: KeySchema) -> None:
    with pytest.raises(InvalidDocumentError, match="weights must sum to > 0"):
        await set_weights(client, schema, "iris", {1: 0})
    assert await client.get(schema.routing("iris")) is None


async def test_an_invalid_stored_document_can_be_fixed(client: EtcdClient, schema: KeySchema) -> None:
    await client.put(schema.routing("iris"), b'{"weights": "oops"}')
    with pytest.raises(InvalidDocumentError):
        await get_routing(client, schema, "iris")
    change = await set_weights(client, schema, "iris", {1: 1})
    assert change.before is None and change.before_error is not None


ACCESS = b'"access": {"claim": "groups", "allow": ["team-a"]}'


async def test_fixing_an_invalid_document_keeps_its_access_rule(client: EtcdClient, schema: KeySchema) -> None:
    await client.put(schema.routing("iris"), b'{"weights": "oops", ' + ACCESS + b"}")
    change = await set_weights(client, schema, "iris", {1: 1})
    assert change.before is None and change.before_error is not None
    assert change.after.access == AccessRule(claim="groups", allow=("team-a",))
    document, _ = await get_routing(client, schema, "iris")
    assert document is not None and document.access == change.after.access


async def test_an_invalid_access_rule_is_never_dropped_silently(client: EtcdClient, schema: KeySchema) -> None:
    await client.put(schema.routing("iris"), b'{"weights": {"1": 1}, "access": {"claim": "a b", "allow": []}}')
    with pytest.raises(InvalidDocumentError, match="access rule is invalid and would be lost"):
        await set_weights(client, schema, "iris", {1: 1})


@pytest.mark.parametrize("stored", [b'{"weights": {"1": 1}, ' + ACCESS + b"}", b'{"weights": 5, ' + ACCESS + b"}"])
async def test_deleting_a_document_reports_the_access_rule_it_drops(client: EtcdClient, schema: KeySchema,
                                                                    stored: bytes) -> None:
    await client.put(schema.routing("iris"), stored)
    deletion = await delete_routing(client, schema, "iris")
    assert deletion.revision > 0 and deletion.dropped_access == AccessRule(claim="groups", allow=("team-a",))
    await set_weights(client, schema, "iris", {1: 1})
    assert (await delete_routing(client, schema, "iris")).dropped_access is None


async def test_watched_state_equals_listed_state(client: EtcdClient, schema: KeySchema) -> None:
    await client.put(schema.instance("iris", 1, "a"), instance("iris", 1, "a"))
    async with contextlib.aclosing(watch_prefix(client, schema.models_prefix)) as events:
        first = await next_event(events)
        assert isinstance(first, Resync)
        state = build_state(schema, first.revision, first.items)
        await client.put(schema.instance("iris", 2, "b"), instance("iris", 2, "b"))
        await set_weights(client, schema, "iris", {1: 1, 2: 3})
        await client.delete(schema.instance("iris", 1, "a"))
        for _ in range(3):
            state = state.apply(await next_event(events))
    listed = await load_state(client, schema)
    assert state.revision == listed.revision
    assert state.models == listed.models
