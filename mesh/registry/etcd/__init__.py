"""etcd access for every sluice component: client, lease keepalive, watch-with-resync.

Only this package imports aetcd.
"""

from mesh.registry.etcd.backoff import Backoff
from mesh.registry.etcd.client import ClusterHeader, EtcdClient, KeyEvent, KeyValue, Snapshot, prefix_range_end
from mesh.registry.etcd.epoch import ClusterEpoch
from mesh.registry.etcd.lease import LeaseKeepAlive
from mesh.registry.etcd.watch import Resync, WatchEvent, watch_prefix

__all__ = [
    "Backoff",
    "ClusterEpoch",
    "ClusterHeader",
    "EtcdClient",
    "KeyEvent",
    "KeyValue",
    "LeaseKeepAlive",
    "Resync",
    "Snapshot",
    "WatchEvent",
    "prefix_range_end",
    "watch_prefix",
]
