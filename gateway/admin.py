"""Envoy's admin API, read to confirm which snapshot is live.

Live means: LDS and CDS report the snapshot's version, every cluster of the snapshot is active
(not warming), the route config carries the version, and every cluster has exactly the
snapshot's endpoints.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfirmError
from gateway.snapshot import ROUTE_CONFIG_NAME, Snapshot


@dataclass(frozen=True)
class LiveConfig:
    """What Envoy reports, from ``/config_dump`` and ``/clusters``."""

    listeners_version: str = ""
    clusters_version: str = ""
    routes_version: str = ""
    active_clusters: frozenset[str] = frozenset()
    warming_clusters: frozenset[str] = frozenset()
    endpoints: Mapping[str, frozenset[str]] = field(default_factory=dict)


def expected_endpoints(snapshot: Snapshot) -> dict[str, frozenset[str]]:
    """Cluster → ``ip:port`` set, as the snapshot assigns them."""
    result = {}
    for name, assignment in snapshot.endpoints.items():
        addresses = set()
        for group in assignment["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                socket = endpoint["endpoint"]["address"]["socket_address"]
                addresses.add(f"{socket['address']}:{socket['port_value']}")
        result[name] = frozenset(addresses)
    return result


def mismatches(snapshot: Snapshot, live: LiveConfig, *, check_endpoints: bool = True) -> list[str]:
    """How ``live`` differs from ``snapshot``; empty when the snapshot is live."""
    problems = []
    for what, version, expected in (("listeners", live.listeners_version, snapshot.listener_version),
                                    ("clusters", live.clusters_version, snapshot.clusters_version),
                                    ("routes", live.routes_version, snapshot.version)):
        if version != expected:
            problems.append(f"{what} at version {version or 'none'}, expected {expected}")
    missing = set(snapshot.clusters) - live.active_clusters
    if missing:
        problems.append(f"clusters not active yet: {', '.join(sorted(missing))}")
    if check_endpoints:
        for name, addresses in expected_endpoints(snapshot).items():
            if name in live.active_clusters and live.endpoints.get(name, frozenset()) != addresses:
                problems.append(f"cluster {name} has endpoints {sorted(live.endpoints.get(name, ()))}, "
                                f"expected {sorted(addresses)}")
    return problems


class EnvoyAdmin:
    """A small client of Envoy's admin API (blocking HTTP runs in its own named executor)."""

    def __init__(self, url: str, *, request_timeout: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.request_timeout = request_timeout
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="envoy-admin")

    def _get_blocking(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=self.request_timeout) as response:
            return bytes(response.read())

    async def get(self, path: str) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._get_blocking, path)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ConfirmError(f"Envoy admin at {self.url} did not answer {path}: {exc}") from exc

    async def ready(self) -> bool:
        """True when Envoy answers ``/ready`` with LIVE."""
        try:
            return (await self.get("/ready")).strip() == b"LIVE"
        except (ConfirmError, urllib.error.HTTPError):
            return False

    async def live_config(self, *, with_endpoints: bool = True) -> LiveConfig:
        dump = json.loads(await self.get("/config_dump"))
        listeners_version = clusters_version = routes_version = ""
        active: set[str] = set()
        warming: set[str] = set()
        for section in dump.get("configs", []):
            kind = section.get("@type", "")
            if kind.endswith("ListenersConfigDump"):
                listeners_version = section.get("version_info", "")
            elif kind.endswith("ClustersConfigDump"):
                clusters_version = section.get("version_info", "")
                active = {c["cluster"]["name"] for c in section.get("dynamic_active_clusters", [])}
                warming = {c["cluster"]["name"] for c in section.get("dynamic_warming_clusters", [])}
            elif kind.endswith("RoutesConfigDump"):
                for route in section.get("dynamic_route_configs", []):
                    if route.get("route_config", {}).get("name") == ROUTE_CONFIG_NAME:
                        routes_version = route.get("version_info", "")
        endpoints: dict[str, frozenset[str]] = {}
        if with_endpoints:
            endpoints = await self.cluster_endpoints()
        return LiveConfig(listeners_version, clusters_version, routes_version, frozenset(active),
                          frozenset(warming), endpoints)

    async def routes_version(self) -> str:
        """The version of the gateway's route config (cheap: one small resource)."""
        dump = json.loads(await self.get("/config_dump?resource=dynamic_route_configs"))
        for route in dump.get("configs", []):
            if route.get("route_config", {}).get("name") == ROUTE_CONFIG_NAME:
                return str(route.get("version_info", ""))
        return ""

    async def cluster_endpoints(self) -> dict[str, frozenset[str]]:
        data: dict[str, Any] = json.loads(await self.get("/clusters?format=json"))
        result = {}
        for cluster in data.get("cluster_statuses", []):
            addresses = set()
            for host in cluster.get("host_statuses", []):
                socket = host.get("address", {}).get("socket_address", {})
                addresses.add(f"{socket.get('address')}:{socket.get('port_value')}")
            result[cluster["name"]] = frozenset(addresses)
        return result

    async def wait_live(self, snapshot: Snapshot, timeout: float, interval: float = 0.003,
                        previous: Snapshot | None = None) -> float:
        """Poll until ``snapshot`` is live; returns the seconds it took. ConfirmError on timeout.

        When ``previous`` (confirmed live before) has the same listener, clusters and endpoints,
        only the route config changed and its version is all there is to check.
        """
        routes_only = previous is not None and (
            previous.listener_version == snapshot.listener_version
            and previous.clusters_version == snapshot.clusters_version
            and previous.endpoints == snapshot.endpoints)
        start = time.monotonic()
        problems: list[str] = ["not checked yet"]
        last_error = ""
        while time.monotonic() - start < timeout:
            try:
                # Every snapshot has its own route version: poll that (small), then check everything.
                routes_version = await self.routes_version()
                if routes_version != snapshot.version:
                    problems = [f"routes at version {routes_version or 'none'}, expected {snapshot.version}"]
                elif routes_only:
                    return time.monotonic() - start
                else:
                    problems = mismatches(snapshot, await self.live_config())
                    if not problems:
                        return time.monotonic() - start
            except ConfirmError as exc:
                last_error = str(exc)
            await asyncio.sleep(interval)
            if time.monotonic() - start > 0.5:
                interval = min(interval * 1.5, 0.1)
        detail = "; ".join(problems) + (f"; last error: {last_error}" if last_error else "")
        raise ConfirmError(f"Envoy did not apply snapshot {snapshot.version} within {timeout:g}s: {detail}")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
