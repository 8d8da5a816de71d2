"""The one rule for "status changed", and the writer every controller uses, against a real etcd."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from mesh.control import StatusWriter, status_changed
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import RoutingDocument, StatusDocument
from mesh.registry.state import build_state

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def status(**changes: object) -> StatusDocument:
    values: dict[str, object] = {"effective_weights": {1: 90, 2: 10}, "applied_revision": 7,
                                 "envoy_config_version": "7.abc", "published_at": NOW, "warnings": [], "errors": []}
    values.update(changes)
    return StatusDocument(**values)


def test_publish_time_and_revision_alone_are_no_change() -> None:
    assert not status_changed(status(), status(published_at=NOW + timedelta(seconds=5), applied_revision=9))
    assert status_changed(None, status())
    for changed in (status(effective_weights={1: 100}), status(envoy_config_version="9.def"),
                    status(warnings=["version 3 has no serving instances"]), status(errors=["rejected"]),
                    status(routing=RoutingDocument(weights={1: 90, 2: 10}))):
        assert status_changed(status(), changed)


async def test_writer_skips_unchanged_documents_and_writes_again_after_a_reset(client: EtcdClient,
                                                                              schema: KeySchema) -> None:
    writer = StatusWriter(client, schema, "test")
    await writer.write({"iris": status()}, None)
    first = await client.get(schema.status("iris"))
    assert first is not None and writer.written["iris"] == status()

    await writer.write({"iris": status(published_at=NOW + timedelta(seconds=1), applied_revision=99)}, None)
    same = await client.get(schema.status("iris"))
    assert same is not None and same.mod_revision == first.mod_revision  # not rewritten

    # A restarted controller knows what is in etcd from the state the watch delivered.
    listing = await client.get_prefix(schema.models_prefix)
    restarted = StatusWriter(client, schema, "test")
    await restarted.write({"iris": status()}, build_state(schema, listing.revision, listing.items))
    again = await client.get(schema.status("iris"))
    assert again is not None and again.mod_revision == first.mod_revision

    writer.forget()  # etcd lost its data: what was written is not trusted
    await writer.write({"iris": status()}, None)
    rewritten = await client.get(schema.status("iris"))
    assert rewritten is not None and rewritten.mod_revision > first.mod_revision

    await writer.remove(["iris"])
    assert await client.get(schema.status("iris")) is None and "iris" not in writer.written
