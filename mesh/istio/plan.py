"""The routing model rendered for Istio: VirtualService weights and the guarded JSON patch that sets them.

Pure functions only (``mesh.istio.sync`` does the I/O). The chart renders one VirtualService per
model (``charts/sluice/templates/istio.yaml``), matching on the headers of :mod:`mesh.protocol`
(mesh-sync only rewrites weights, so it needs no header names itself), with

* one pin route per version (``x-model-name`` + ``x-model-version`` → subset ``v<N>``), and
* one route named :data:`WEIGHTED_ROUTE` (``x-model-name`` → every subset ``v<N>`` with a weight).

``sluice mesh-sync`` computes the weights with :func:`mesh.registry.state.resolve_weights`, the same
rules the Envoy gateway uses, scales them to Istio's percentages and writes them with a JSON patch
whose ``test`` operations make the API server refuse it if the object changed since it was read.

Two annotations on the VirtualService remember what mesh-sync did, so that an edit made by
someone else (``kubectl edit``) is detected and left alone rather than silently overwritten:

* :data:`ANNOTATION_WEIGHTS`: the weights mesh-sync (or the chart) last wrote;
* :data:`ANNOTATION_REVISION`: the etcd revision of the routing document they came from;
* :data:`ANNOTATION_HELD`: set when weights were found edited outside etcd, to the routing
  revision in force then; a routing document written to etcd after that takes over again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mesh.errors import MeshError
from mesh.registry.state import ModelState, resolve_weights

WEIGHTED_ROUTE = "weighted"
"""Name of the HTTP route whose destination weights mesh-sync owns."""
ANNOTATION_WEIGHTS = "sluice.io/applied-weights"
ANNOTATION_REVISION = "sluice.io/routing-revision"
ANNOTATION_HELD = "sluice.io/held-revision"
ISTIO_TOTAL_WEIGHT = 100

_SUBSET_RE = re.compile(r"v([1-9][0-9]{0,17})")


class IstioError(MeshError):
    """A VirtualService that mesh-sync cannot work with (no weighted route, unknown subset…)."""


def subset_name(version: int) -> str:
    """Version 3 → DestinationRule subset ``v3`` (also the pods' ``version`` label)."""
    return f"v{version}"


def parse_subset(name: str) -> int | None:
    match = _SUBSET_RE.fullmatch(name)
    return int(match[1]) if match else None


def percentages(weights: Mapping[int, int]) -> dict[int, int]:
    """Relative weights → integers summing to exactly 100 (largest remainder; ties favour newer versions).

    A positive weight never rounds down to 0, so a 1-in-1000 canary still gets 1 %.
    """
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"weights {dict(weights)} sum to {total}, not more than 0")
    positive = [version for version, weight in weights.items() if weight > 0]
    if len(positive) > ISTIO_TOTAL_WEIGHT:
        raise ValueError(f"{len(positive)} weighted versions do not fit into {ISTIO_TOTAL_WEIGHT} percent")
    exact = {version: ISTIO_TOTAL_WEIGHT * weight / total for version, weight in weights.items()}
    result = {version: max(int(share), 1 if weights[version] > 0 else 0) for version, share in exact.items()}
    order = sorted(positive, key=lambda v: (exact[v] - int(exact[v]), v), reverse=True)
    while sum(result.values()) < ISTIO_TOTAL_WEIGHT:
        for version in order:
            if sum(result.values()) == ISTIO_TOTAL_WEIGHT:
                break
            result[version] += 1
    # Minimum-1 bumps can overshoot: take back from the largest shares.
    while sum(result.values()) > ISTIO_TOTAL_WEIGHT:
        largest = max(result, key=lambda v: (result[v], v))
        result[largest] -= 1
    return dict(sorted(result.items()))


@dataclass(frozen=True)
class WeightedRoute:
    """The :data:`WEIGHTED_ROUTE` of a VirtualService as found: where it is and what it says."""

    index: int
    """Position in ``spec.http``."""
    destinations: tuple[dict[str, Any], ...]
    """The ``route`` list as stored (each item has ``destination.subset`` ``v<N>``)."""
    weights: dict[int, int]
    """Version → weight in the route (a single destination without ``weight`` counts as 100)."""


def read_weighted_route(virtual_service: Mapping[str, Any]) -> WeightedRoute:
    """Find the weighted route of a VirtualService object; :class:`IstioError` if it is not usable."""
    name = _name(virtual_service)
    http = (virtual_service.get("spec") or {}).get("http") or []
    for index, route in enumerate(http):
        if route.get("name") != WEIGHTED_ROUTE:
            continue
        destinations = tuple(route.get("route") or [])
        if not destinations:
            raise IstioError(f"VirtualService {name}: route {WEIGHTED_ROUTE!r} has no destinations")
        weights: dict[int, int] = {}
        for item in destinations:
            subset = str((item.get("destination") or {}).get("subset", ""))
            version = parse_subset(subset)
            if version is None:
                raise IstioError(f"VirtualService {name}: destination subset {subset!r} of route "
                                 f"{WEIGHTED_ROUTE!r} is not v<version>")
            if version in weights:
                raise IstioError(f"VirtualService {name}: subset {subset!r} appears twice in route "
                                 f"{WEIGHTED_ROUTE!r}")
            default = ISTIO_TOTAL_WEIGHT if len(destinations) == 1 else 0
            weights[version] = int(item.get("weight", default))
        return WeightedRoute(index, destinations, weights)
    raise IstioError(f"VirtualService {name} has no HTTP route named {WEIGHTED_ROUTE!r} "
                     "(is it the one the sluice chart rendered?)")


@dataclass(frozen=True)
class MeshWeights:
    """Weights for a VirtualService: every routed subset (0 for the unused ones), summing to 100."""

    weights: dict[int, int]
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def mesh_weights(plan_weights: Mapping[int, int], subsets: Sequence[int]) -> MeshWeights:
    """Fit the weights of a :class:`~mesh.registry.state.WeightPlan` onto the subsets a VirtualService routes to.

    Versions without a subset (not deployed by the chart) are dropped with a warning; if no
    weight is left, the result has an error and no weights.
    """
    warnings: list[str] = []
    usable: dict[int, int] = {}
    for version, weight in sorted(plan_weights.items()):
        if version in subsets:
            usable[version] = weight
        elif weight > 0:
            warnings.append(f"version {version} has weight {weight} but the VirtualService has no subset "
                            f"{subset_name(version)} (deploy it with the chart)")
    if sum(usable.values()) <= 0:
        return MeshWeights({}, warnings, ["no weighted version has a subset in the VirtualService"])
    scaled = percentages(usable)
    return MeshWeights({version: scaled.get(version, 0) for version in sorted(subsets)}, warnings)


def encode_weights(weights: Mapping[int, int]) -> str:
    """The annotation form: ``{"1": 90, "2": 10}`` (sorted, compact)."""
    return json.dumps({str(v): w for v, w in sorted(weights.items())}, separators=(",", ":"))


def decode_weights(text: str | None) -> dict[int, int] | None:
    """Inverse of :func:`encode_weights`; None when absent or unreadable."""
    if not text:
        return None
    try:
        data = json.loads(text)
        return {int(v): int(w) for v, w in data.items()}
    except (ValueError, TypeError, AttributeError):
        return None


def _pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): ``~`` → ``~0``, ``/`` → ``~1``."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _name(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return f"{metadata.get('namespace', '')}/{metadata.get('name', '?')}".lstrip("/")


def _annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def _revision_annotation(annotations: Mapping[str, str], key: str) -> int | None:
    try:
        return int(annotations[key])
    except (KeyError, ValueError):
        return None


def build_patch(virtual_service: Mapping[str, Any], route: WeightedRoute, weights: Mapping[int, int] | None,
                annotations: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """A guarded JSON patch (RFC 6902) that sets ``weights`` (None: leave them) and ``annotations``.

    It starts with ``test`` operations on ``metadata.resourceVersion`` and on the weighted route as
    read, so the API server rejects the whole patch if anyone changed the object in between. An
    annotation value of None removes that annotation.
    """
    metadata = virtual_service.get("metadata") or {}
    ops: list[dict[str, Any]] = []
    if metadata.get("resourceVersion"):
        ops.append({"op": "test", "path": "/metadata/resourceVersion", "value": metadata["resourceVersion"]})
    ops.append({"op": "test", "path": _pointer("spec", "http", route.index, "route"),
                "value": list(route.destinations)})
    if weights is not None:
        for position, item in enumerate(route.destinations):
            version = parse_subset(str(item["destination"]["subset"]))
            assert version is not None  # read_weighted_route checked every subset
            ops.append({"op": "add", "path": _pointer("spec", "http", route.index, "route", position, "weight"),
                        "value": int(weights.get(version, 0))})
    existing = _annotations(virtual_service)
    changes = {key: value for key, value in annotations.items() if existing.get(key) != value}
    if changes and "annotations" not in metadata:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    for key, value in sorted(changes.items()):
        if value is None:
            if key in existing:
                ops.append({"op": "remove", "path": _pointer("metadata", "annotations", key)})
        else:
            ops.append({"op": "add", "path": _pointer("metadata", "annotations", key), "value": value})
    return ops


class Action(str, Enum):
    """What :func:`plan_sync` decided to do with one VirtualService."""

    NONE = "none"
    """Nothing to write: in sync, or nothing to go by (no routing document, invalid document…)."""
    PATCH = "patch"
    """Set the weights (and the annotations that record them)."""
    HOLD = "hold"
    """Weights were edited outside etcd: record that in an annotation and leave them."""


@dataclass(frozen=True)
class SyncPlan:
    """The decision for one model's VirtualService and the status to report for it."""

    action: Action
    patch: list[dict[str, Any]]
    effective_weights: dict[int, int]
    """Weights the VirtualService has once ``patch`` (if any) is applied."""
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def plan_sync(model: ModelState, virtual_service: Mapping[str, Any]) -> SyncPlan:
    """Decide what to do with ``virtual_service`` given the registry's view of ``model``.

    * No routing document in etcd: the VirtualService keeps its weights (the chart's values).
    * Invalid routing document: keep the weights (the last good ones), report the error.
    * Weights differ from :data:`ANNOTATION_WEIGHTS` (someone edited them): never overwrite; hold
      (record the routing revision in :data:`ANNOTATION_HELD`) and report; a routing document
      written to etcd after the hold takes over.
    * Otherwise: patch the weights :func:`resolve_weights` gives, scaled to 100, if they differ.
    """
    try:
        route = read_weighted_route(virtual_service)
    except IstioError as exc:
        return SyncPlan(Action.NONE, [], {}, errors=[str(exc)])
    current = route.weights
    if model.routing is None:
        warnings: list[str] = []
        errors = [f"routing: {model.routing_error} (the VirtualService keeps its weights)"] if model.routing_error \
            else []
        if not errors:
            warnings.append("no routing document in etcd: the VirtualService keeps its weights from the chart")
        return SyncPlan(Action.NONE, [], current, warnings, errors)

    annotations = _annotations(virtual_service)
    applied = decode_weights(annotations.get(ANNOTATION_WEIGHTS))
    held = _revision_annotation(annotations, ANNOTATION_HELD)
    revision = model.routing_revision
    if applied is not None and applied != current and (held is None or revision <= held):
        message = (f"VirtualService {_name(virtual_service)} weights were changed outside etcd to "
                   f"{encode_weights(current)} (last applied {encode_weights(applied)}): not overwritten; "
                   "write the weights to etcd (sluice weights set) to take over again")
        if held is None:
            patch = build_patch(virtual_service, route, None, {ANNOTATION_HELD: str(revision)})
            return SyncPlan(Action.HOLD, patch, current, errors=[message])
        return SyncPlan(Action.NONE, [], current, errors=[message])

    plan = resolve_weights(model)
    if not plan.weights:
        return SyncPlan(Action.NONE, [], current, plan.warnings,
                        [*plan.errors, "the VirtualService keeps its weights"])
    fitted = mesh_weights(plan.weights, sorted(current))
    warnings = [*plan.warnings, *fitted.warnings]
    errors = [*plan.errors, *fitted.errors]
    if not fitted.weights:
        return SyncPlan(Action.NONE, [], current, warnings, [*errors, "the VirtualService keeps its weights"])
    wanted_annotations: dict[str, str | None] = {
        ANNOTATION_WEIGHTS: encode_weights(fitted.weights),
        ANNOTATION_REVISION: str(revision),
        ANNOTATION_HELD: None,
    }
    weights_change = fitted.weights != current
    annotations_change = any(annotations.get(k) != v for k, v in wanted_annotations.items())
    if not weights_change and not annotations_change:
        return SyncPlan(Action.NONE, [], current, warnings, errors)
    patch = build_patch(virtual_service, route, fitted.weights if weights_change else None, wanted_annotations)
    return SyncPlan(Action.PATCH, patch, fitted.weights, warnings, errors)


def apply_json_patch(document: Mapping[str, Any], patch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Apply the subset of RFC 6902 that :func:`build_patch` emits (test/add/remove) to a copy.

    For unit tests and dry runs; raises :class:`IstioError` when a ``test`` fails, as the API server does.
    """
    result: dict[str, Any] = json.loads(json.dumps(document))
    for op in patch:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = result
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last: Any = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        if op["op"] == "test":
            try:
                found = parent[last]
            except (KeyError, IndexError) as exc:
                raise IstioError(f"test failed: {op['path']} does not exist") from exc
            if found != op["value"]:
                raise IstioError(f"test failed: {op['path']} is {found!r}, not {op['value']!r}")
        elif op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(last, op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[last]
        else:
            raise IstioError(f"unsupported op {op['op']!r}")
    return result
