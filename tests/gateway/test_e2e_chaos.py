"""Chaos under continuous load: nothing a client sends through the gateway fails.

Real etcd, two real ``sluice serve`` processes registering themselves (A and B, each serving iris
versions 1 and 2 from its own repository), the real controller (``sluice gateway`` in external-Envoy
mode) and the real Envoy, run by this test through :class:`gateway.envoy.EnvoyProcess` on the
bootstrap that ``sluice gateway --write-bootstrap`` wrote, so that restarting the controller leaves
Envoy serving. Eight client threads call ModelInfer with ``tritonclient`` through Envoy the whole
time while, in order:

1. 50 weight changes (each confirmed in the status document);
2. instance B is SIGKILLed (requests in flight on it are retried by Envoy on A);
3. a new version 3 lands in A's repository, registers, and gets weight;
4. version 1 leaves A's repository: A deregisters it, waits ``--deregister-grace``, drains it;
5. the controller is SIGKILLed; weights change while it is down; a new controller takes over;
6. Envoy is hot-restarted (a new epoch takes over the listener, the old one drains and exits);
7. an operator writes an invalid routing document with etcdctl.

Each step is checked for effect, and at the end: zero failed requests, and traffic in every step.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from examples.build_models import build_iris
from gateway.envoy import EnvoyProcess, find_envoy
from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import StatusDocument
from mesh.registry.state import set_weights
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import ManagedProcess
from tests.fixtures.service import ServiceHandle, sluice_argv
from tests.gateway.test_e2e_routing import read_status, wait_status
from tests.gateway.traffic import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(150)]

CLIENTS = 8
WEIGHT_CHANGES = 50
STEP_TIMEOUT_S = 15.0
LEASE_TTL_S = 3
PREFIX = "/sluice-gw-chaos/"


@dataclass
class Load:
    """Client threads calling through the gateway; successes and failures per phase."""

    address: str
    phase: str = "start"
    ok: collections.Counter[str] = field(default_factory=collections.Counter)
    versions: collections.Counter[str] = field(default_factory=collections.Counter)
    protocols: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int) -> None:
        # Every other client speaks REST (tritonclient.http, no header: the path names the model).
        for index in range(clients):
            target = self._run_rest if index % 2 else self._run
            thread = threading.Thread(target=target, name=f"chaos-client-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _record(self, phase: str, version: str | None, failure: str | None, protocol: str = "gRPC") -> None:
        with self._lock:
            if failure is not None:
                self.failures.append(f"[{phase}] {failure}")
            else:
                self.ok[phase] += 1
                self.versions[str(version)] += 1
                self.protocols[protocol] += 1

    def _run(self) -> None:
        data = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        tensor = grpcclient.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(data)
        with grpcclient.InferenceServerClient(self.address) as client:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    result = client.infer("iris", [tensor], headers={"x-model-name": "iris"}, client_timeout=20.0)
                except InferenceServerException as exc:
                    self._record(phase, None, f"gRPC {exc.status()}: {exc.message()}")
                    continue
                self._record(phase, result.get_response().model_version, None)

    def _run_rest(self) -> None:
        data = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        tensor = httpclient.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(data)
        client = httpclient.InferenceServerClient(self.address, network_timeout=20.0, connection_timeout=20.0)
        try:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    result = client.infer("iris", [tensor])
                except InferenceServerException as exc:
                    self._record(phase, None, f"REST {exc.status()}: {exc.message()}")
                    continue
                except OSError as exc:  # a connection the gateway closed (tritonclient's socket layer)
                    self._record(phase, None, f"REST connection: {exc}")
                    continue
                self._record(phase, result.get_response()["model_version"], None, "REST")
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def total(self) -> int:
        with self._lock:
            return sum(self.ok.values())


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Repositories of instances A and B (iris 1 and 2 each) and a spare copy of version 1's files."""
    built = tmp_path_factory.mktemp("chaos-built")
    build_iris(built)
    repos = {}
    for name in ("a", "b"):
        repo = tmp_path_factory.mktemp(f"chaos-{name}")
        shutil.copytree(built / "iris", repo / "iris")
        repos[name] = repo
    repos["spare"] = built / "iris" / "1"
    return repos


def _start_service(etcd: EtcdServer, repo: Path, workdir: Path, name: str) -> ServiceHandle:
    port, metrics_port, rest_port = free_port(), free_port(), free_port()
    argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port", str(metrics_port),
                       "--rest-port", str(rest_port), "--etcd", etcd.endpoint, "--prefix", PREFIX,
                       "--instance-id", name,
                       "--lease-ttl", str(LEASE_TTL_S), "--deregister-grace", "2", "--grace-period", "2",
                       "--reload-quiet-ms", "100", "--log-format", "json")
    return ServiceHandle(ManagedProcess(name, argv, workdir / f"{name}.log"), port, metrics_port, repo, rest_port)


@pytest.fixture
def services(shared_etcd: EtcdServer, repos: dict[str, Path], tmp_path: Path) -> Iterator[dict[str, ServiceHandle]]:
    handles = {name: _start_service(shared_etcd, repos[name], tmp_path, name) for name in ("a", "b")}
    try:
        for handle in handles.values():
            handle.process.wait_until(handle.ready, 90.0, "ServerReady")
        yield handles
    finally:
        for handle in handles.values():
            handle.process.stop()


@dataclass
class Gateway:
    """The controller's flags, shared by ``--write-bootstrap``, both controller runs and the test."""

    etcd: EtcdServer
    workdir: Path
    listen_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    controller: ManagedProcess | None = None
    runs: int = 0

    @property
    def xds_dir(self) -> Path:
        return self.workdir / "xds"

    @property
    def bootstrap(self) -> Path:
        return self.workdir / "envoy-bootstrap.yaml"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def argv(self, *extra: str) -> list[str]:
        return sluice_argv(
            "gateway", "--etcd", self.etcd.endpoint, "--prefix", PREFIX, "--listen-host", "127.0.0.1",
            "--listen-port", str(self.listen_port), "--admin-port", str(self.admin_port),
            "--xds-dir", str(self.xds_dir), "--access-log", str(self.workdir / "access.log"),
            "--metrics-port", "0", "--health-check-interval", "0.5", "--log-format", "json", *extra)

    def start_controller(self) -> ManagedProcess:
        self.runs += 1
        self.controller = ManagedProcess(f"controller-{self.runs}", self.argv(
            "--envoy-admin", f"http://127.0.0.1:{self.admin_port}"), self.workdir / f"controller-{self.runs}.log")
        return self.controller

    def server_info(self) -> dict[str, object]:
        url = f"http://127.0.0.1:{self.admin_port}/server_info"
        with urllib.request.urlopen(url, timeout=2) as response:
            info: dict[str, object] = json.loads(response.read())
        return info

    def routes_version(self) -> str:
        url = f"http://127.0.0.1:{self.admin_port}/config_dump?resource=dynamic_route_configs"
        with urllib.request.urlopen(url, timeout=2) as response:
            configs = json.loads(response.read()).get("configs", [])
        return str(configs[0].get("version_info", "")) if configs else ""


@pytest.fixture
async def gateway(shared_etcd: EtcdServer, tmp_path: Path) -> AsyncIterator[tuple[Gateway, EnvoyProcess]]:
    """External Envoy (run here) + the controller as its own process; all stopped at the end."""
    gw = Gateway(shared_etcd, tmp_path / "gateway")
    gw.workdir.mkdir()
    written = await asyncio.create_subprocess_exec(*gw.argv("--write-bootstrap", str(gw.bootstrap)),
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(written.communicate(), 60)
    assert written.returncode == 0, output.decode()
    assert gw.bootstrap.is_file() and (gw.xds_dir / "lds.yaml").is_file()
    envoy = EnvoyProcess(find_envoy(), gw.bootstrap, concurrency=2)
    await envoy.start()
    try:
        gw.start_controller()
        yield gw, envoy
    finally:
        if gw.controller is not None:
            await asyncio.to_thread(gw.controller.stop)
        await envoy.stop()


@pytest.fixture(scope="module")
def gateway_prefix() -> str:
    """The conftest's etcd ``client`` and ``schema`` fixtures work under this module's prefix."""
    return PREFIX


async def test_chaos_under_load_costs_no_request(
        shared_etcd: EtcdServer, services: dict[str, ServiceHandle], repos: dict[str, Path], *,
        gateway: tuple[Gateway, EnvoyProcess], client: EtcdClient, schema: KeySchema, tmp_path: Path) -> None:
    gw, envoy = gateway
    started = time.monotonic()

    async def status_is(predicate: Callable[[StatusDocument], bool], what: str) -> StatusDocument:
        return await wait_status(client, schema, predicate, what, timeout=STEP_TIMEOUT_S)

    async def instances(version: int) -> set[str]:
        found = await client.get_prefix(schema.instances_prefix("iris", version))
        return {schema.parse(kv.key).instance_id or "" for kv in found.items}

    async def registered(instance: str, version: int) -> bool:
        return instance in await instances(version)

    async def deregistered(instance: str, *versions: int) -> bool:
        return not any([await registered(instance, version) for version in versions])

    async def logged(service: ServiceHandle, event: str) -> bool:
        return event in service.process.log_text()

    async def weights(new: dict[int, int]) -> None:
        await set_weights(client, schema, "iris", new)
        await status_is(lambda s: s.effective_weights == {v: w for v, w in new.items() if w} and not s.errors,
                        f"weights {new} live")

    async def run_load_for(seconds: float) -> None:
        before = load.total()
        await asyncio.sleep(seconds)
        assert load.total() > before, f"no request succeeded in {seconds}s of phase {load.phase}"

    await status_is(lambda s: s.effective_weights == {2: 100}, "both services registered, newest version live")
    assert await instances(1) == await instances(2) == {"a", "b"}
    load = Load(gw.address)
    load.start(CLIENTS)
    try:
        await run_load_for(1.0)

        load.phase = "weights"
        rng = random.Random(5)
        for _ in range(WEIGHT_CHANGES):
            first = rng.choice([0, 10, 25, 50, 75, 90, 100])
            await weights({1: first, 2: 100 - first})
        await weights({1: 50, 2: 50})
        await run_load_for(0.5)

        load.phase = "sigkill-instance"
        services["b"].process.signal(signal.SIGKILL)
        await eventually(lambda: deregistered("b", 1, 2), STEP_TIMEOUT_S, "B's records expire with its lease")
        await run_load_for(1.0)

        load.phase = "new-version"
        incoming = tmp_path / "incoming-3"
        shutil.copytree(repos["spare"], incoming)
        incoming.rename(repos["a"] / "iris" / "3")  # arrives complete, by rename
        await eventually(lambda: registered("a", 3), STEP_TIMEOUT_S, "version 3 registered by A")
        await weights({1: 30, 2: 30, 3: 40})
        await run_load_for(1.0)

        load.phase = "drain-version"
        (repos["a"] / "iris" / "1").rename(tmp_path / "retired-1")
        await eventually(lambda: deregistered("a", 1), STEP_TIMEOUT_S, "version 1 deregistered by A")
        drained = await status_is(lambda s: s.effective_weights == {2: 30, 3: 40}, "version 1 out of the routes")
        assert any("version 1 has weight 30 but no serving instances" in w for w in drained.warnings), drained
        await eventually(lambda: logged(services["a"], "model_version_unloaded"), STEP_TIMEOUT_S, "A drained version 1")
        await run_load_for(1.0)

        load.phase = "controller-restart"
        assert gw.controller is not None
        gw.controller.signal(signal.SIGKILL)
        await asyncio.to_thread(gw.controller.stop)
        await set_weights(client, schema, "iris", {2: 50, 3: 50})  # while no controller runs
        await run_load_for(1.0)  # Envoy keeps serving the last published config
        gw.start_controller()
        await weights({2: 50, 3: 50})
        await run_load_for(1.0)

        load.phase = "envoy-restart"
        old_pid = envoy.pid
        new_pid = await envoy.hot_restart()
        assert new_pid != old_pid

        async def new_epoch_live() -> bool:
            try:
                info = await asyncio.to_thread(gw.server_info)
            except OSError:
                return False
            options = info.get("command_line_options")
            return isinstance(options, dict) and options.get("restart_epoch") == 1 and info.get("state") == "LIVE"

        await eventually(new_epoch_live, STEP_TIMEOUT_S, "Envoy epoch 1 live")
        await weights({2: 20, 3: 80})  # the controller publishes to, and confirms with, the new Envoy
        live = await read_status(client, schema)
        assert live is not None and live.envoy_config_version == await asyncio.to_thread(gw.routes_version)
        assert envoy.draining_pids == [old_pid]

        async def old_epoch_gone() -> bool:
            return not envoy.draining_pids

        # Every client connection moves over (GOAWAY, reconnect) before the old Envoy exits.
        await eventually(old_epoch_gone, STEP_TIMEOUT_S, "the old Envoy drained and exited")
        await run_load_for(1.0)

        load.phase = "invalid-routing"
        shared_etcd.etcdctl("put", schema.routing("iris"), '{"weights": {"2": -5, "3": 80}}')
        rejected = await status_is(lambda s: bool(s.errors), "status error for the invalid document")
        assert any("-5" in e for e in rejected.errors), rejected.errors
        assert rejected.effective_weights == {2: 20, 3: 80}
        await run_load_for(1.0)
    finally:
        load.stop()

    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert load.protocols["REST"] > 0 and load.protocols["gRPC"] > 0, load.protocols
    phases = ["start", "weights", "sigkill-instance", "new-version", "drain-version", "controller-restart",
              "envoy-restart", "invalid-routing"]
    assert all(load.ok[phase] > 0 for phase in phases), load.ok
    assert {"1", "2", "3"} <= set(load.versions), load.versions
    print(f"chaos: {load.total()} requests, 0 failed, {time.monotonic() - started:.1f}s; per phase {dict(load.ok)}")
