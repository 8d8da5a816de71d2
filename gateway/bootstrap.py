"""Envoy's bootstrap (file-based LDS + CDS) and the static config used to validate a snapshot.

``envoy --mode validate`` reads only the bootstrap, never the dynamic files it points to, so a
snapshot is validated by embedding it: the listener with its routes inline, every cluster STATIC
with its endpoints inline.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.snapshot import CDS_FILE, LDS_FILE, Resource, Snapshot, thaw

NODE_ID = "sluice-gateway"


def _file_source(directory: str, name: str) -> Resource:
    return {"resource_api_version": "V3",
            "path_config_source": {"path": f"{directory}/{name}", "watched_directory": {"path": directory}}}


def _admin(admin_port: int) -> Resource:
    # Admin can change Envoy's state (/quitquitquit, /runtime_modify): loopback only, never 0.0.0.0.
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}


def bootstrap(xds_dir: str, admin_port: int) -> Resource:
    """The bootstrap of a gateway Envoy: listeners and clusters come from files in ``xds_dir``."""
    return {
        "node": {"id": NODE_ID, "cluster": NODE_ID},
        "admin": _admin(admin_port),
        "dynamic_resources": {
            "lds_config": _file_source(xds_dir, LDS_FILE),
            "cds_config": _file_source(xds_dir, CDS_FILE),
        },
    }


def _static_secrets(resource: object) -> None:
    """Point every SDS secret reference inside ``resource`` at a static secret (in place)."""
    if isinstance(resource, dict):
        if "sds_config" in resource and "name" in resource:
            del resource["sds_config"]
        for value in resource.values():
            _static_secrets(value)
    elif isinstance(resource, list):
        for value in resource:
            _static_secrets(value)


def validation_config(snapshot: Snapshot, admin_port: int = 9901,
                      secrets: Sequence[Resource] = ()) -> Resource:
    """A static bootstrap holding the whole snapshot, for ``envoy --mode validate``.

    The SDS secrets the snapshot names (gateway/tls.py) are embedded as static secrets.
    """
    listener = thaw(snapshot.listener)
    _static_secrets(listener)
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            hcm = network_filter["typed_config"]
            if "rds" in hcm:
                del hcm["rds"]
                hcm["route_config"] = thaw(snapshot.route_config())
    clusters = []
    for name in sorted(snapshot.clusters):
        cluster = thaw(snapshot.clusters[name])
        cluster.pop("eds_cluster_config", None)
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = thaw(snapshot.endpoints[name])
        _static_secrets(cluster)
        clusters.append(cluster)
    static: Resource = {"listeners": [listener], "clusters": clusters}
    if secrets:
        static["secrets"] = [thaw(secret) for secret in secrets]
    return {
        "node": {"id": NODE_ID, "cluster": NODE_ID},
        "admin": _admin(admin_port),
        "static_resources": static,
    }
