"""Telling an etcd that lost its data from one that merely restarted: the one place that decides.

After a member is wiped and started again on the same address (or the cluster is rebuilt from a
backup), revisions start again from 1. A consumer that resumes from the revision it saw last then
waits for a revision that may lie far ahead and misses everything written meanwhile; a lease it
holds no longer exists. etcd's response headers give it away: a different cluster id, a revision
below one already seen, or a raft term below one already seen (terms are persisted and never go
back in a cluster that kept its data). Another member behind the same endpoint is not a sign on its
own: behind a load-balanced address every reconnect may reach another member of the same cluster,
and a replaced member catches up with the cluster's data before it answers.

Every consumer (:func:`mesh.registry.etcd.watch_prefix`, hence the gateway and mesh-sync, and the
registrar) keeps one :class:`ClusterEpoch` and feeds it the headers it gets. A false alarm (a
failover to a member that lags behind) only costs a resync; a missed one costs correctness.
Not detectable from headers: a wiped single member whose new revision and term have both caught
up with the old ones before the consumer reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.registry.etcd.client import ClusterHeader


@dataclass
class ClusterEpoch:
    """What one consumer has seen of the cluster so far."""

    cluster_id: int | None = None
    revision: int = 0
    raft_term: int = 0

    def observe(self, header: ClusterHeader, seen_revision: int = 0) -> str | None:
        """Take ``header`` in; returns why the cluster is not the one seen before (it went
        backwards: resync, re-register), or None. ``seen_revision`` is the newest revision the
        consumer saw by other means (the last watch event). After an alarm the epoch starts
        over from ``header``."""
        newest = max(self.revision, seen_revision)
        problem: str | None = None
        if self.cluster_id is not None and header.cluster_id != self.cluster_id:
            problem = f"cluster id changed from {self.cluster_id:x} to {header.cluster_id:x}"
        elif header.revision < newest:
            problem = f"revision went back from {newest} to {header.revision}"
        elif header.raft_term < self.raft_term:
            problem = f"raft term went back from {self.raft_term} to {header.raft_term}"
        if problem is not None:
            self.revision, self.raft_term = header.revision, header.raft_term
        else:
            self.revision, self.raft_term = max(newest, header.revision), max(self.raft_term, header.raft_term)
        self.cluster_id = header.cluster_id
        return problem
