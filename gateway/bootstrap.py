"""Envoy's bootstrap (file-based LDS + CDS) and the static config used to validate a snapshot.

``envoy --mode validate`` reads only the bootstrap, never the dynamic files it points to, so a
snapshot is validated by embedding it: the listener with its routes inline, every cluster STATIC
with its endpoints inline.
"""

from __future__ import annotations

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


def validation_config(snapshot: Snapshot, admin_port: int = 9901) -> Resource:
    """A static bootstrap holding the whole snapshot, for ``envoy --mode validate``."""
    listener = thaw(snapshot.listener)
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
        clusters.append(cluster)
    return {
        "node": {"id": NODE_ID, "cluster": NODE_ID},
        "admin": _admin(admin_port),
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
