"""Weight-change propagation: etcd write → Envoy serving the new split, over many changes.

Starts a throwaway etcd, two ``sluice serve`` processes (iris v1, iris v2), and ``sluice gateway``
(which runs Envoy); registers the two instances; then N times writes new weights with
``mesh.registry.state.set_weights`` (the CLI's compare-and-swap) and polls Envoy's admin API
(``/config_dump?resource=dynamic_route_configs``, over one kept-alive connection) until the live
route carries exactly the new weights. Prints p50/p90/p99/max as a Markdown table.

    python -m bench.propagation --changes 100
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/propagation.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.build_models import build_iris
from mesh.devstack.stack import etcd_argv, find_etcd
from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord
from mesh.registry.settings import EtcdSettings
from mesh.registry.state import set_weights

PREFIX = "/sluice-bench/"



def etcd_binary() -> str:
    return find_etcd() or "etcd"


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def tear_down(procs: list[subprocess.Popen[bytes]], workdir: Path, *, keep: bool) -> None:
    """Stop what a benchmark started (last first) and remove its files unless ``keep``."""
    for proc in reversed(procs):
        stop(proc)
    if keep:
        print(f"logs in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Admin:
    """Envoy admin over one kept-alive HTTP/1.1 connection (polling cost stays ~1 ms)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)

    def get(self, path: str) -> bytes:
        try:
            self.conn.request("GET", path)
            return self.conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            raise

    def live_weights(self) -> dict[str, int]:
        dump = json.loads(self.get("/config_dump?resource=dynamic_route_configs"))
        for config in dump.get("configs", []):
            for vhost in config["route_config"].get("virtual_hosts", []):
                for route in vhost.get("routes", []):
                    if route.get("name") == "iris/split":
                        action = route["route"]
                        if "cluster" in action:
                            return {action["cluster"]: 1}
                        return {c["name"]: int(c["weight"]) for c in action["weighted_clusters"]["clusters"]}
        return {}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def measure(admin: Admin, settings: EtcdSettings, changes: int, seed: int, timeout: float) -> list[float]:
    schema = KeySchema(settings.prefix)
    rng = random.Random(seed)
    samples: list[float] = []
    async with EtcdClient(settings) as client:
        previous = -1
        for _ in range(changes):
            share = rng.choice([w for w in range(5, 96, 5) if w != previous])
            previous = share
            expected = {"iris.v1": share, "iris.v2": 100 - share}
            started = time.perf_counter()
            await set_weights(client, schema, "iris", {1: share, 2: 100 - share})
            while admin.live_weights() != expected:
                if time.perf_counter() - started > timeout:
                    raise SystemExit(f"weights {expected} not live after {timeout}s")
                await asyncio.sleep(0.001)
            samples.append(time.perf_counter() - started)
            await asyncio.sleep(rng.uniform(0.05, 0.15))  # changes arrive one at a time, not in a burst
    return samples


async def register(settings: EtcdSettings, addresses: dict[int, str]) -> None:
    schema = KeySchema(settings.prefix)
    async with EtcdClient(settings) as client:
        await client.delete_prefix(schema.models_prefix)
        for version, address in addresses.items():
            record = InstanceRecord(address=address, model="iris", version=version, instance_id=f"bench-v{version}")
            await client.put(schema.instance("iris", version, record.instance_id), record.to_json())
        await set_weights(client, schema, "iris", {1: 50, 2: 50})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=100, help="weight changes to time (default 100)")
    parser.add_argument("--debounce-ms", type=int, default=20, help="the gateway's --debounce-ms (default 20)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one change may take")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sluice-propagation-"))
    procs: list[subprocess.Popen[bytes]] = []
    python = [sys.executable, "-m", "mesh.cli"]
    try:
        etcd_port, peer_port = free_port(), free_port()
        procs.append(start(etcd_argv(etcd_binary(), workdir / "etcd", etcd_port, peer_port, durable=False),
                           workdir / "etcd.log"))
        settings = EtcdSettings(endpoints=[f"127.0.0.1:{etcd_port}"], prefix=PREFIX)
        build_iris(workdir / "built")
        addresses = {}
        for version in (1, 2):
            repo = workdir / f"repo-v{version}" / "iris"
            repo.mkdir(parents=True)
            shutil.copy(workdir / "built" / "iris" / "config.yaml", repo / "config.yaml")
            shutil.copytree(workdir / "built" / "iris" / str(version), repo / str(version))
            port = free_port()
            procs.append(start([*python, "serve", "--repo", str(repo.parent), "--port", str(port),
                                "--metrics-port", "-1", "--log-format", "json"], workdir / f"serve-v{version}.log"))
            addresses[version] = f"127.0.0.1:{port}"
        admin_port = free_port()
        procs.append(start([*python, "gateway", "--etcd", f"127.0.0.1:{etcd_port}", "--prefix", PREFIX,
                            "--listen-host", "127.0.0.1", "--listen-port", str(free_port()),
                            "--admin-port", str(admin_port), "--metrics-port", "-1",
                            "--xds-dir", str(workdir / "xds"), "--access-log", str(workdir / "access.log"),
                            "--debounce-ms", str(args.debounce_ms), "--log-format", "json"],
                           workdir / "gateway.log"))
        admin = Admin(admin_port)
        wait(lambda: admin.get("/ready").strip() == b"LIVE", 60, "Envoy ready")
        asyncio.run(register(settings, addresses))
        wait(lambda: admin.live_weights() == {"iris.v1": 50, "iris.v2": 50}, 60, "first split live")
        samples = asyncio.run(measure(admin, settings, args.changes, args.seed, args.timeout))
        ms = [s * 1000 for s in samples]
        print(f"\nweight change → Envoy serving the new split, {len(ms)} changes, debounce {args.debounce_ms} ms\n")
        print("| changes | p50 ms | p90 ms | p99 ms | max ms |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {len(ms)} | {percentile(ms, 50):.1f} | {percentile(ms, 90):.1f} | {percentile(ms, 99):.1f} "
              f"| {max(ms):.1f} |")
    finally:
        tear_down(procs, workdir, keep=args.keep)


if __name__ == "__main__":
    main()
