"""Read side of the registry: an immutable :class:`RegistryState` built from a listing and updated
from watch events by pure functions (the gateway renders Envoy config from it), plus the
compare-and-swap writes of routing documents used by the CLI.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from mesh.errors import ConflictError, InvalidDocumentError, InvalidKeyError
from mesh.registry.etcd.client import EtcdClient, KeyEvent, KeyValue
from mesh.registry.etcd.watch import WatchEvent
from mesh.registry.keys import KeyKind, KeySchema, validate_model_name, validate_version
from mesh.registry.records import (
    AccessRule,
    InstanceRecord,
    InstanceState,
    RoutingDocument,
    StatusDocument,
    parse_access_rule,
    parse_routing_document,
)

_EMPTY: Mapping[bytes, KeyValue] = MappingProxyType({})


@dataclass(frozen=True)
class ModelState:
    """Everything the registry says about one model."""

    name: str
    instances: Mapping[int, Mapping[str, InstanceRecord]] = field(default_factory=dict)
    """Version → instance id → record."""
    routing: RoutingDocument | None = None
    """The valid routing document, None when missing or invalid (see ``routing_error``)."""
    routing_error: str | None = None
    routing_revision: int = 0
    """mod_revision of the routing key (0: no routing document): the compare-and-swap token."""
    status: StatusDocument | None = None
    status_error: str | None = None
    problems: tuple[str, ...] = ()
    """Instance records that could not be read; they are left out of ``instances``."""

    def versions(self) -> list[int]:
        """Versions with at least one registered instance, ascending."""
        return sorted(version for version, records in self.instances.items() if records)

    def serving_versions(self) -> list[int]:
        """Versions with at least one instance in state ``serving``, ascending."""
        return sorted(version for version, records in self.instances.items()
                      if any(r.state is InstanceState.SERVING for r in records.values()))


@dataclass(frozen=True)
class WeightPlan:
    """Weights to put into a route, from :func:`resolve_weights`."""

    weights: dict[int, int]
    warnings: list[str]
    errors: list[str]


def resolve_weights(model: ModelState, routing: RoutingDocument | None = None) -> WeightPlan:
    """Which versions get how much traffic, following the documented rules.

    ``routing`` overrides ``model.routing`` (a gateway passes its last good document when the
    current one is invalid). Weighted versions without serving instances are dropped with a
    warning; if nothing is left, ``default_version`` (if serving) or else the newest serving
    version takes all traffic. Without a routing document the newest serving version takes all.
    """
    routing = routing if routing is not None else model.routing
    warnings: list[str] = []
    errors: list[str] = [f"routing: {model.routing_error}"] if model.routing_error else []
    serving = model.serving_versions()
    if not serving:
        if routing is not None or model.instances:
            errors.append(f"model {model.name!r} has no serving instances")
        return WeightPlan({}, warnings, errors)
    if routing is None:
        return WeightPlan({serving[-1]: 100}, warnings, errors)
    weights: dict[int, int] = {}
    for version, weight in sorted(routing.weights.items()):
        if version in serving:
            weights[version] = weight
        elif weight > 0:
            warnings.append(f"version {version} has weight {weight} but no serving instances")
    if sum(weights.values()) > 0:
        return WeightPlan(weights, warnings, errors)
    fallback = routing.default_version if routing.default_version in serving else serving[-1]
    warnings.append(f"no weighted version is serving: all traffic to version {fallback}")
    return WeightPlan({fallback: 100}, warnings, errors)


@dataclass(frozen=True)
class RegistryState:
    """Models → versions → instances, routing and status documents, as of ``revision``.

    Immutable: :meth:`apply` returns a new state. Build one with :func:`build_state`.
    """

    schema: KeySchema
    revision: int
    models: Mapping[str, ModelState]
    unknown_keys: Mapping[bytes, str] = field(default_factory=dict)
    """Keys under ``models/`` that do not fit the schema → why."""
    entries: Mapping[str, Mapping[bytes, KeyValue]] = field(default_factory=dict, repr=False)
    """Raw key-values per model, kept for incremental updates."""

    def apply(self, event: WatchEvent) -> RegistryState:
        """The state after one watch event (a resync replaces everything)."""
        return apply_event(self, event)

    def model(self, name: str) -> ModelState | None:
        return self.models.get(name)


def build_state(schema: KeySchema, revision: int, items: tuple[KeyValue, ...] | list[KeyValue]) -> RegistryState:
    """A :class:`RegistryState` from a listing of ``schema.models_prefix`` at ``revision``."""
    entries: dict[str, dict[bytes, KeyValue]] = {}
    unknown: dict[bytes, str] = {}
    for kv in items:
        try:
            model = schema.parse(kv.key).model
        except InvalidKeyError as exc:
            unknown[kv.key] = str(exc)
            continue
        entries.setdefault(model, {})[kv.key] = kv
    frozen = {name: MappingProxyType(kvs) for name, kvs in entries.items()}
    models = {name: build_model(schema, name, kvs) for name, kvs in frozen.items()}
    return RegistryState(schema, revision, MappingProxyType(models), MappingProxyType(unknown),
                         MappingProxyType(frozen))


def apply_event(state: RegistryState, event: WatchEvent) -> RegistryState:
    """Pure update of ``state`` by one watch event; only the touched model is rebuilt."""
    if not isinstance(event, KeyEvent):
        return build_state(state.schema, event.revision, event.items)
    key = event.kv.key
    try:
        model = state.schema.parse(key).model
    except InvalidKeyError as exc:
        unknown = dict(state.unknown_keys)
        if event.kind == "put":
            unknown[key] = str(exc)
        else:
            unknown.pop(key, None)
        return replace(state, revision=event.revision, unknown_keys=MappingProxyType(unknown))
    model_entries = dict(state.entries.get(model, _EMPTY))
    if event.kind == "put":
        model_entries[key] = event.kv
    else:
        model_entries.pop(key, None)
    entries = dict(state.entries)
    models = dict(state.models)
    if model_entries:
        entries[model] = MappingProxyType(model_entries)
        models[model] = build_model(state.schema, model, entries[model])
    else:
        entries.pop(model, None)
        models.pop(model, None)
    return replace(state, revision=event.revision, models=MappingProxyType(models),
                   entries=MappingProxyType(entries))


def keep_missing(current: RegistryState, held: RegistryState) -> RegistryState:
    """``current`` plus what ``held`` had and ``current`` lacks: instances (by version and instance
    id), routing documents, whole models. What ``current`` has wins.

    For rendering only (``entries`` are those of ``current``: never apply events to the result).
    The gateway renders this for a while after etcd came back without its data, so the routes in
    force stay while the services register again, instead of dropping to "no model registered".
    """
    models = dict(current.models)
    for name, old in held.models.items():
        new = models.get(name)
        if new is None:
            models[name] = old
            continue
        instances = {version: dict(records) for version, records in new.instances.items()}
        for version, records in old.instances.items():
            for instance_id, record in records.items():
                instances.setdefault(version, {}).setdefault(instance_id, record)
        has_routing = new.routing is not None or new.routing_error is not None
        models[name] = replace(
            new,
            instances=MappingProxyType({v: MappingProxyType(r) for v, r in sorted(instances.items())}),
            routing=new.routing if has_routing else old.routing,
        )
    return replace(current, models=MappingProxyType(dict(sorted(models.items()))))


def build_model(schema: KeySchema, name: str, entries: Mapping[bytes, KeyValue]) -> ModelState:
    """Parse one model's key-values into a :class:`ModelState` (bad documents become errors, not exceptions)."""
    instances: dict[int, dict[str, InstanceRecord]] = {}
    problems: list[str] = []
    routing: RoutingDocument | None = None
    routing_error: str | None = None
    routing_revision = 0
    status: StatusDocument | None = None
    status_error: str | None = None
    for key, kv in sorted(entries.items()):
        parsed = schema.parse(key)
        if parsed.kind is KeyKind.ROUTING:
            routing_revision = kv.mod_revision
            try:
                routing = parse_routing_document(kv.value)
            except InvalidDocumentError as exc:
                routing_error = str(exc)
        elif parsed.kind is KeyKind.STATUS:
            try:
                status = StatusDocument.from_json(kv.value)
            except InvalidDocumentError as exc:
                status_error = str(exc)
        elif parsed.kind is KeyKind.ROLLOUT:
            continue  # read by the rollout controller (mesh.rollout), not by routing
        else:
            assert parsed.version is not None and parsed.instance_id is not None
            try:
                record = InstanceRecord.from_json(kv.value)
            except InvalidDocumentError as exc:
                problems.append(f"{key.decode(errors='replace')}: {exc}")
                continue
            if (record.model, record.version, record.instance_id) != (name, parsed.version, parsed.instance_id):
                problems.append(f"{key.decode(errors='replace')}: record names model {record.model!r} "
                                f"version {record.version} instance {record.instance_id!r}, not its key")
                continue
            instances.setdefault(parsed.version, {})[parsed.instance_id] = record
    return ModelState(
        name=name,
        instances=MappingProxyType({v: MappingProxyType(r) for v, r in sorted(instances.items())}),
        routing=routing,
        routing_error=routing_error,
        routing_revision=routing_revision,
        status=status,
        status_error=status_error,
        problems=tuple(problems),
    )


async def load_state(client: EtcdClient, schema: KeySchema) -> RegistryState:
    """List the whole registry once (the CLI's view; long-running components use ``watch_prefix``)."""
    snapshot = await client.get_prefix(schema.models_prefix)
    return build_state(schema, snapshot.revision, snapshot.items)


@dataclass(frozen=True)
class RoutingChange:
    """The outcome of a routing write: what was there, what is there now, at which revision."""

    model: str
    before: RoutingDocument | None
    before_error: str | None
    after: RoutingDocument
    revision: int


@dataclass(frozen=True)
class RoutingDeletion:
    """The outcome of :func:`delete_routing`; ``revision`` 0: there was no document to delete."""

    model: str
    before: RoutingDocument | None
    before_error: str | None
    revision: int
    dropped_access: AccessRule | None = None
    """The access rule the deleted document carried: the model's routes now fall back to the
    default rule (the caller's access claim lists the model), which may allow other callers."""


def access_of_invalid(model: str, raw: bytes) -> AccessRule | None:
    """The ``access`` of an invalid routing document when that field is valid on its own (None
    when there is none). An ``access`` that is itself invalid raises :class:`InvalidDocumentError`:
    dropping it would silently put the model under the default rule, which can widen access."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("access") is None:
        return None
    problems: list[str] = []
    access = parse_access_rule(data["access"], problems)
    if access is None or problems:
        raise InvalidDocumentError(f"routing document of model {model!r}", [
            *problems, "its access rule is invalid and would be lost: write the whole document (weights and "
            "a valid access) with etcdctl, or fix the access rule first"])
    return access


async def get_routing(client: EtcdClient, schema: KeySchema, model: str) -> tuple[RoutingDocument | None, int]:
    """The model's routing document (None if absent) and its mod_revision (0 if absent).

    Raises :class:`InvalidDocumentError` if the stored document is invalid.
    """
    kv = await client.get(schema.routing(model))
    if kv is None:
        return None, 0
    return parse_routing_document(kv.value), kv.mod_revision


async def set_weights(
    client: EtcdClient,
    schema: KeySchema,
    model: str,
    weights: Mapping[Any, Any],
    *,
    sticky_header: str | None = None,
    default_version: int | None = None,
    expected_revision: int | None = None,
) -> RoutingChange:
    """Replace the weights of ``model`` with one compare-and-swap transaction.

    ``weights`` maps version → weight (``{"1": 90, 2: 10}``); it is checked by the shared validator.

    ``sticky_header``/``default_version``: None keeps the current value, ``""``/``0`` removes it.
    ``expected_revision`` (the ``routing_revision`` an operator looked at; 0 = "must not exist")
    makes the write fail if anything changed since. Either way, a concurrent write between this
    function's read and its write raises :class:`ConflictError`: nobody is silently overwritten.
    """
    validate_model_name(model)
    key = schema.routing(model)
    current = await client.get(key)
    before: RoutingDocument | None = None
    before_error: str | None = None
    kept_access: AccessRule | None = None
    mod_revision = 0
    if current is not None:
        mod_revision = current.mod_revision
        try:
            before = parse_routing_document(current.value)
        except InvalidDocumentError as exc:
            before_error = str(exc)  # overwriting an invalid document is how it gets fixed
            kept_access = access_of_invalid(model, current.value)  # ... keeping its access rule
    if expected_revision is not None and expected_revision != mod_revision:
        raise ConflictError(f"routing of model {model!r} is at revision {mod_revision}, "
                            f"not the expected {expected_revision}: re-read it and try again")
    if sticky_header is None:
        sticky_header = before.sticky_header if before else None
    if default_version is None:
        default_version = before.default_version if before else None
    after = RoutingDocument.from_weights(weights, sticky_header=sticky_header or None,
                                         default_version=default_version or None,
                                         access=before.access if before else kept_access)
    written, revision, now = await client.put_if_mod_revision(key, after.to_json(), mod_revision)
    if not written:
        changed_to = now.mod_revision if now is not None else 0
        raise ConflictError(f"routing of model {model!r} changed concurrently (revision {mod_revision} → "
                            f"{changed_to}): re-read it and try again")
    return RoutingChange(model, before, before_error, after, revision)


async def delete_routing(client: EtcdClient, schema: KeySchema, model: str, *,
                         expected_revision: int | None = None) -> RoutingDeletion:
    """Delete the routing document of ``model`` with one compare-and-delete transaction (the
    newest serving version then takes all traffic). ``expected_revision`` as in :func:`set_weights`;
    a concurrent write raises :class:`ConflictError`. Deleting an absent document changes nothing."""
    validate_model_name(model)
    key = schema.routing(model)
    current = await client.get(key)
    if current is None:
        if expected_revision:
            raise ConflictError(f"model {model!r} has no routing document, not one at the expected "
                                f"revision {expected_revision}")
        return RoutingDeletion(model, None, None, 0)
    if expected_revision is not None and expected_revision != current.mod_revision:
        raise ConflictError(f"routing of model {model!r} is at revision {current.mod_revision}, "
                            f"not the expected {expected_revision}: re-read it and try again")
    before: RoutingDocument | None = None
    before_error: str | None = None
    dropped_access: AccessRule | None = None
    try:
        before = parse_routing_document(current.value)
        dropped_access = before.access
    except InvalidDocumentError as exc:
        before_error = str(exc)
        with contextlib.suppress(InvalidDocumentError):
            dropped_access = access_of_invalid(model, current.value)
    deleted, revision = await client.delete_if_mod_revision(key, current.mod_revision)
    if not deleted:
        raise ConflictError(f"routing of model {model!r} changed concurrently (revision {current.mod_revision} → "
                            f"{revision}): re-read it and try again")
    return RoutingDeletion(model, before, before_error, revision, dropped_access)


async def promote(client: EtcdClient, schema: KeySchema, model: str, version: int | str, *,
                  expected_revision: int | None = None) -> RoutingChange:
    """Send all traffic of ``model`` to ``version`` (weights become ``{version: 100}``)."""
    return await set_weights(client, schema, model, {validate_version(version): 100},
                             expected_revision=expected_revision)
