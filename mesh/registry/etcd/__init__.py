"""etcd access for every sluice component: client, lease keepalive, watch-with-resync.

Only this package imports aetcd.
"""

from mesh.etcd.backoff import Backoff
from mesh.etcd.client import ClusterHeader, EtcdClient, KeyEvent, KeyValue, Snapshot, prefix_range_end
from mesh.etcd.epoch import ClusterEpoch
from mesh.etcd.lease import LeaseKeepAlive
from mesh.etcd.watch import Resync, WatchEvent, watch_prefix

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
