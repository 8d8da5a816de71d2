"""An immutable, versioned Envoy snapshot (listener, clusters, endpoints, routes) and its checks.

A :class:`Snapshot` is what :func:`gateway.render.render_snapshot` returns and what the publisher
writes: one file per xDS type plus one EDS file per cluster. Like go-control-plane's snapshot it
is immutable all the way down (its resources are frozen when it is made), its version is stamped
once by :meth:`Snapshot.build`, and :meth:`Snapshot.consistent` is checked before anything is
validated or published. :func:`transition` orders the snapshots that take Envoy from one to the next.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from gateway.errors import InconsistentSnapshotError
from mesh.registry.records import RoutingDocument

LISTENER_NAME = "sluice_grpc"
ROUTE_CONFIG_NAME = "sluice_routes"
LDS_FILE = "lds.yaml"
CDS_FILE = "cds.yaml"
RDS_FILE = "rds.yaml"
CONFIG_VERSION_HEADER = "x-sluice-config"
"""Every response carries the config version that routed it (debugging, propagation benchmark)."""

TYPE_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
TYPE_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPE_ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_ENDPOINTS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

_UINT32_MAX = 2**32 - 1
_CLUSTER_RE = re.compile(r"(?P<model>.+)\.v(?P<version>[1-9][0-9]*)")

Resource = dict[str, Any]


class FrozenResource(dict[str, Any]):
    """A dict that refuses changes: every mapping inside a :class:`Snapshot` is one.

    A dict (not a MappingProxyType) so that ``json`` and the YAML dumper take it as it is; a copy
    (``copy.deepcopy``, ``{**r}``) is an ordinary, changeable dict.
    """

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("a snapshot's resources are immutable: build a new snapshot")

    __setitem__ = __delitem__ = setdefault = update = pop = popitem = clear = _refuse
    __ior__ = _refuse

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return thaw(self)  # type: ignore[no-any-return]


class FrozenList(list[Any]):
    """A list that refuses changes (see :class:`FrozenResource`)."""

    def _refuse(self, *_args: Any, **_kwargs: Any) -> NoReturn:
        raise TypeError("a snapshot's resources are immutable: build a new snapshot")

    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return thaw(self)  # type: ignore[no-any-return]


def freeze(value: Any) -> Any:
    """``value`` with every dict and list inside made immutable (frozen parts are reused as they are)."""
    kind = type(value)
    if kind is dict:
        return FrozenResource({key: freeze(item) if type(item) in _CONTAINERS else item
                               for key, item in value.items()})
    if kind is list or kind is tuple:
        return FrozenList([freeze(item) if type(item) in _CONTAINERS else item for item in value])
    if kind is not FrozenResource and isinstance(value, Mapping):  # a MappingProxyType, say
        return freeze(dict(value))
    return value


# Exact types (a type lookup, not isinstance: a snapshot holds thousands of small values).
_CONTAINERS = frozenset({dict, list, tuple, MappingProxyType})


def thaw(value: Any) -> Any:
    """An ordinary, changeable deep copy of ``value`` (e.g. to embed a resource in another config)."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, list):
        return [thaw(item) for item in value]
    return value


def cluster_name(model: str, version: int) -> str:
    """``iris`` version 2 → ``iris.v2`` (unique: a version is digits only, parsed from the right)."""
    return f"{model}.v{version}"


def parse_cluster_name(name: str) -> tuple[str, int] | None:
    match = _CLUSTER_RE.fullmatch(name)
    return (match["model"], int(match["version"])) if match else None


def eds_file(cluster: str) -> str:
    """The EDS file of one cluster (Envoy's EDS takes exactly one resource per file)."""
    return f"eds-{cluster}.yaml"


@dataclass(frozen=True)
class ModelPlan:
    """What the snapshot does with one model: the weights in its route and why."""

    model: str
    weights: Mapping[int, int]
    """Version → weight in the route (empty: the model has no serving version)."""
    sticky_header: str | None = None
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    routing_source: str = "none"
    """``document`` (valid routing document), ``last-good`` (invalid one, last good kept),
    ``none`` (no routing document: newest serving version)."""
    routing: RoutingDocument | None = None
    """The routing document in force (the last good one while the current one is invalid)."""
    routing_revision: int = 0
    """mod_revision of the model's routing key when this plan was made (0: no document)."""


@dataclass(frozen=True)
class Snapshot:
    """Every resource Envoy gets, as of registry ``revision``; ``version`` names it in Envoy.

    Make one with :meth:`build` (which stamps the version); the constructor is for a snapshot whose
    version was stamped before (read back from the published files). Either way the resources are
    frozen (:func:`freeze`): a snapshot never changes once made.
    """

    version: str
    revision: int
    listener: Resource
    clusters: Mapping[str, Resource]
    endpoints: Mapping[str, Resource]
    """Cluster name → ClusterLoadAssignment."""
    routes: Resource
    """The route configuration; the config-version header is added when it is written (:meth:`route_config`)."""
    plans: Mapping[str, ModelPlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("listener", "clusters", "endpoints", "routes"):
            object.__setattr__(self, name, freeze(getattr(self, name)))
        if not isinstance(self.plans, FrozenResource):
            object.__setattr__(self, "plans", FrozenResource(self.plans))

    @classmethod
    def build(cls, revision: int, *, listener: Resource, clusters: Mapping[str, Resource],
              endpoints: Mapping[str, Resource], routes: Resource,
              plans: Mapping[str, ModelPlan] | None = None) -> Snapshot:
        """The snapshot of these resources as of ``revision``, versioned ``<revision>.<content hash>``."""
        listener, clusters, endpoints, routes = (freeze(part) for part in (listener, clusters, endpoints, routes))
        version = f"{revision}.{content_hash(listener, clusters, endpoints, routes)}"
        return cls(version, revision, listener, clusters, endpoints, routes, plans or {})

    def consistent(self) -> None:
        """Raise :class:`~gateway.errors.InconsistentSnapshotError` if Envoy would reject or
        mis-route the snapshot (see :func:`consistency_problems`); checked before it is published."""
        problems = consistency_problems(self)
        if problems:
            raise InconsistentSnapshotError(f"inconsistent snapshot {self.version}: " + "; ".join(problems))

    @property
    def content_hash(self) -> str:
        """Hash of the resources without the version: equal hashes mean nothing to publish."""
        return self.version.rpartition(".")[2]

    @property
    def listener_version(self) -> str:
        """LDS version: a hash of the listener. Envoy keeps its old LDS version when nothing changed,
        so a content hash is what stays comparable."""
        return f"lds.{content_hash(self.listener)}"

    @property
    def clusters_version(self) -> str:
        """CDS version: a hash of the clusters (see :attr:`listener_version`)."""
        return f"cds.{content_hash(self.clusters)}"

    def route_clusters(self) -> set[str]:
        """Every cluster a route points at."""
        return set(_route_clusters(self.routes))

    def route_config(self) -> Resource:
        """The route configuration as Envoy gets it: every response names the config version."""
        header = {"header": {"key": CONFIG_VERSION_HEADER, "value": self.version},
                  "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        return {**self.routes, "response_headers_to_add": [header]}

    def files(self) -> dict[str, bytes]:
        """File name → YAML bytes; each file is a DiscoveryResponse-shaped ``{version_info, resources}``."""
        files = {
            LDS_FILE: _dump(self.listener_version, TYPE_LISTENER, [self.listener]),
            CDS_FILE: _dump(self.clusters_version, TYPE_CLUSTER,
                            [self.clusters[name] for name in sorted(self.clusters)]),
            RDS_FILE: _dump(self.version, TYPE_ROUTES, [self.route_config()]),
        }
        for name in sorted(self.endpoints):
            assignment = self.endpoints[name]
            files[eds_file(name)] = _dump(f"eds.{content_hash(assignment)}", TYPE_ENDPOINTS, [assignment])
        return files


# libyaml's emitter is ~10x faster than the pure-Python one; publishing latency is a feature here.
_Dumper = yaml.CSafeDumper if getattr(yaml, "__with_libyaml__", False) else yaml.SafeDumper


class _NoAliasDumper(_Dumper):  # type: ignore[valid-type,misc]
    """Shared sub-dicts are written out in full: no YAML anchors in files Envoy reads."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_NoAliasDumper.add_representer(FrozenResource, yaml.representer.SafeRepresenter.represent_dict)
_NoAliasDumper.add_representer(FrozenList, yaml.representer.SafeRepresenter.represent_list)


def dump_yaml(document: Any) -> bytes:
    return yaml.dump(document, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False).encode()


_dump_cache: dict[tuple[str, str], bytes] = {}


def _dump(version: str, type_url: str, resources: list[Resource]) -> bytes:
    """YAML of one xDS file; ``version`` is a content hash, so an unchanged file is not dumped again."""
    key = (type_url, version)
    cached = _dump_cache.get(key)
    if cached is None:
        if len(_dump_cache) > 512:
            _dump_cache.clear()
        cached = dump_yaml({"version_info": version, "resources": [{"@type": type_url, **r} for r in resources]})
        _dump_cache[key] = cached
    return cached


def _route_clusters(routes: Resource) -> list[str]:
    found: list[str] = []
    for vhost in routes.get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            action = route.get("route")
            if not action:
                continue
            if "cluster" in action:
                found.append(action["cluster"])
            for weighted in action.get("weighted_clusters", {}).get("clusters", []):
                found.append(weighted["name"])
    return found


def _weights(routes: Resource) -> list[list[int]]:
    groups = []
    for vhost in routes.get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            weighted = (route.get("route") or {}).get("weighted_clusters")
            if weighted:
                groups.append([int(c["weight"]) for c in weighted["clusters"]])
    return groups


def consistency_problems(snapshot: Snapshot) -> list[str]:
    """Everything that would make Envoy reject (or mis-route) the snapshot; empty when consistent."""
    problems: list[str] = []
    for name in sorted(snapshot.route_clusters()):
        if name not in snapshot.clusters:
            problems.append(f"route points at cluster {name!r}, which the snapshot does not define")
    for name in sorted(snapshot.clusters):
        if name not in snapshot.endpoints:
            problems.append(f"cluster {name!r} has no endpoint assignment")
    for name in sorted(snapshot.endpoints):
        if name not in snapshot.clusters:
            problems.append(f"endpoint assignment {name!r} belongs to no cluster")
    for group in _weights(snapshot.routes):
        if any(w < 1 or w > _UINT32_MAX for w in group) or not 0 < sum(group) <= _UINT32_MAX:
            problems.append(f"weights {group} are invalid: each 1..{_UINT32_MAX}, sum at most {_UINT32_MAX}")
    for model, plan in snapshot.plans.items():
        if plan.weights and sum(plan.weights.values()) <= 0:
            problems.append(f"model {model!r}: weights sum to 0")
    return problems


def shape_key(snapshot: Snapshot) -> str:
    """Hash of the snapshot with weights and versions masked out.

    Two snapshots with the same shape differ only in weight values, which
    :func:`consistency_problems` checks; the controller validates a shape with Envoy once.
    """
    routes = thaw(snapshot.routes)
    for vhost in routes.get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            weighted = (route.get("route") or {}).get("weighted_clusters")
            if weighted:
                for item in weighted["clusters"]:
                    item["weight"] = 1
    return content_hash(snapshot.listener, snapshot.clusters, snapshot.endpoints, routes)


def content_hash(*parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()[:12]


def snapshot_from_files(documents: Mapping[str, Mapping[str, Any]]) -> Snapshot | None:
    """Rebuild the published snapshot from its files (see :func:`gateway.publish.load_published`).

    Plans are not in the files: the result serves to know which clusters and routes Envoy has.
    """
    def resources(name: str) -> list[Resource]:
        document = documents.get(name) or {}
        return [{k: v for k, v in r.items() if k != "@type"} for r in document.get("resources", [])]

    listeners, routes = resources(LDS_FILE), resources(RDS_FILE)
    if not listeners or not routes:
        return None
    # The config-version header is added when the file is written (Snapshot.route_config).
    bare_routes = {k: v for k, v in routes[0].items() if k != "response_headers_to_add"}
    clusters = {c["name"]: c for c in resources(CDS_FILE)}
    endpoints = {}
    for name in clusters:
        found = resources(eds_file(name))
        if found:
            endpoints[name] = found[0]
    version = str((documents.get(RDS_FILE) or {}).get("version_info", "0.unknown"))
    revision_text = version.partition(".")[0]
    revision = int(revision_text) if revision_text.isdigit() else 0
    return Snapshot(version, revision, listeners[0], clusters, endpoints, bare_routes)


def transition(live: Snapshot | None, wanted: Snapshot) -> list[Snapshot]:
    """The snapshots to publish in order so that no route ever names a cluster Envoy lacks.

    Envoy reloads every watched file on one move, in no fixed order; with ``validate_clusters``
    a route to a cluster that is not there yet is rejected. So: new clusters first (old routes),
    then the new routes (old clusters still there), then drop the clusters nothing routes to.
    """
    if live is None:
        return [wanted]
    added = set(wanted.clusters) - set(live.clusters)
    removed = set(live.clusters) - set(wanted.clusters)
    clusters = {**live.clusters, **wanted.clusters}
    endpoints = {**live.endpoints, **wanted.endpoints}
    steps = []
    if added:
        steps.append(Snapshot.build(wanted.revision, listener=wanted.listener, clusters=clusters,
                                    endpoints=endpoints, routes=live.routes, plans=wanted.plans))
    if removed:
        steps.append(Snapshot.build(wanted.revision, listener=wanted.listener, clusters=clusters,
                                    endpoints=endpoints, routes=wanted.routes, plans=wanted.plans))
    steps.append(wanted)
    return steps
