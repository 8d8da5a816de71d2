"""Real processes shared by the gateway's end-to-end tests: etcd, model services, the gateway.

The e2e tests of this folder share three ``sluice serve`` processes (iris version 1 twice, iris
version 2 once, each from its own repository so ``model_version`` in a response tells them
apart); each module has one gateway on its own key prefix. Instances are registered by writing
their records to etcd, as a service's registrar would, so a module routes to the fleet only under
its own prefix. A module that kills a fleet member starts a fleet of its own (:func:`started_fleet`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.build_models import build_iris
from gateway.envoy import find_envoy
from mesh.devstack.pki import DevPki
from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, InstanceState
from mesh.registry.settings import EtcdSettings
from tests.fixtures.envoy import GatewayHandle, start_gateway
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import ManagedProcess, wait_for
from tests.fixtures.service import ServiceHandle, sluice_argv

SERVICE_START_TIMEOUT_S = 90.0


@pytest.fixture(scope="session")
def iris_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Version → a repository holding only that version of ``iris``."""
    built = tmp_path_factory.mktemp("iris-built")
    build_iris(built)
    repos = {}
    for version in (1, 2):
        repo = tmp_path_factory.mktemp(f"iris-v{version}")
        (repo / "iris").mkdir()
        shutil.copy(built / "iris" / "config.yaml", repo / "iris" / "config.yaml")
        shutil.copytree(built / "iris" / str(version), repo / "iris" / str(version))
        repos[version] = repo
    return repos


def _start_service(repo: Path, workdir: Path, name: str) -> ServiceHandle:
    port, metrics_port, rest_port = free_port(), free_port(), free_port()
    argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port", str(metrics_port),
                       "--rest-port", str(rest_port), "--log-format", "json", "--grace-period", "2")
    process = ManagedProcess(name, argv, workdir / f"{name}.log")
    return ServiceHandle(process, port, metrics_port, repo, rest_port)


@dataclass
class Fleet:
    """The shared services: ``v1`` (two instances) and ``v2`` (one)."""

    v1: list[ServiceHandle]
    v2: list[ServiceHandle]

    def all(self) -> list[ServiceHandle]:
        return [*self.v1, *self.v2]


def started_fleet(iris_repos: dict[int, Path], workdir: Path) -> Iterator[Fleet]:
    """A fleet for a fixture to yield (``yield from``), every member ready; stopped when the fixture ends."""
    handles = [_start_service(iris_repos[1], workdir, "iris-v1-a"), _start_service(iris_repos[1], workdir, "iris-v1-b"),
               _start_service(iris_repos[2], workdir, "iris-v2-a")]
    try:
        for handle in handles:  # started together, awaited one by one: start-up overlaps
            handle.process.wait_until(handle.ready, SERVICE_START_TIMEOUT_S, "ServerReady")
        yield Fleet(handles[:2], handles[2:])
    finally:
        # All asked to stop at once, so their shutdowns overlap; stop() forces what is left.
        for handle in handles:
            handle.process.signal(signal.SIGTERM)
        for handle in handles:
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.process.proc.wait(timeout=10)
            handle.process.stop()


@pytest.fixture(scope="package")
def fleet(iris_repos: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The fleet the e2e modules of this folder share, from the first that asks until the folder's last test."""
    yield from started_fleet(iris_repos, tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def gateway_prefix(request: pytest.FixtureRequest) -> str:
    return f"/sluice-gw-{request.module.__name__.rpartition('.')[2].replace('_', '-')}/"


def running_gateway(shared_etcd: EtcdServer, prefix: str, directory: Path, *,
                    envoy_binary: str | None = None) -> Iterator[GatewayHandle]:
    """A gateway process for a fixture to yield (``yield from``); stopped when the fixture ends."""
    handle = start_gateway(shared_etcd, prefix, directory, envoy_binary=envoy_binary)
    try:
        yield handle
    finally:
        handle.stop()


def gateway_serving(etcd: EtcdServer, prefix: str, workdir: Path, service: ServiceHandle, *extra: str,
                    instance_id: str = "v1") -> Iterator[GatewayHandle]:
    """A gateway for a fixture to yield (``yield from``) with ``service`` registered as iris version
    1, REST address included, as its registrar writes it; stopped when the fixture ends."""
    handle = start_gateway(etcd, prefix, workdir, *extra)
    try:
        register(etcd, KeySchema(prefix), service, 1, instance_id, rest=True)
        yield handle
    finally:
        handle.stop()


def repository_control_service(repo: Path, workdir: Path, name: str) -> Iterator[ServiceHandle]:
    """A ``sluice serve --repository-control`` of ``repo`` for a fixture to yield (``yield from``),
    ready first; stopped when the fixture ends."""
    port, metrics_port, rest_port = free_port(), free_port(), free_port()
    argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port", str(metrics_port),
                       "--rest-port", str(rest_port), "--log-format", "json", "--grace-period", "2",
                       "--repository-control")
    handle = ServiceHandle(ManagedProcess(name, argv, workdir / f"{name}.log"), port, metrics_port, repo, rest_port)
    try:
        handle.process.wait_until(handle.ready, SERVICE_START_TIMEOUT_S, "ServerReady")
        yield handle
    finally:
        handle.process.stop()


def mtls_service(repo: Path, pki: DevPki, workdir: Path, name: str) -> Iterator[ServiceHandle]:
    """A ``sluice serve`` of ``repo`` for a fixture to yield (``yield from``) that speaks TLS with the
    dev PKI's service certificate and requires a client certificate signed by its CA; stopped when
    the fixture ends."""
    port, metrics_port, rest_port = free_port(), free_port(), free_port()
    argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port",
                       str(metrics_port), "--rest-port", str(rest_port), "--log-format", "json",
                       "--tls-cert", str(pki.service.cert), "--tls-key", str(pki.service.key),
                       "--tls-client-ca", str(pki.ca.cert))
    handle = ServiceHandle(ManagedProcess(name, argv, workdir / f"{name}.log"), port, metrics_port, repo, rest_port)
    try:
        wait_for(lambda: "listening" in handle.process.log_text(), 60, "the TLS service listening")
        yield handle
    finally:
        handle.process.stop()


@pytest.fixture(scope="module")
def secure_service(iris_repos: dict[int, Path], pki: DevPki,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    """iris version 1 served over TLS, a client certificate of the module's CA required (:func:`mtls_service`)."""
    yield from mtls_service(iris_repos[1], pki, tmp_path_factory.mktemp("secure-service"), "iris-mtls")


REJECTING_ENVOY = """\
#!{python}
import os, sys, tempfile
import yaml
REAL, MARKER = {real!r}, {marker!r}
args = sys.argv[1:]
if "--mode" in args and os.path.exists(MARKER):
    path = args[args.index("-c") + 1]
    with open(path) as handle:
        config = yaml.safe_load(handle)
    config["static_resources"]["listeners"][0]["no_such_field"] = 1
    fd, broken = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle)
    args[args.index("-c") + 1] = broken
os.execv(REAL, [REAL, *args])
"""
"""A wrapper around the real Envoy: while the marker file exists, the config it is asked to validate
gets an unknown field, and the real ``envoy --mode validate`` refuses it (a real rejection)."""


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists, the :func:`rejecting_gateway`'s Envoy refuses every config it validates."""
    return tmp_path_factory.mktemp("marker") / "reject"


@pytest.fixture(scope="module")
def rejecting_gateway(shared_etcd: EtcdServer, gateway_prefix: str, marker: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """The module's gateway, its Envoy run through :data:`REJECTING_ENVOY` (validations fail while
    ``marker`` exists)."""
    workdir = tmp_path_factory.mktemp("rejecting-gateway")
    wrapper = workdir / "envoy-wrapper"
    wrapper.write_text(REJECTING_ENVOY.format(python=sys.executable, real=find_envoy(), marker=str(marker)))
    wrapper.chmod(0o755)
    yield from running_gateway(shared_etcd, gateway_prefix, workdir, envoy_binary=str(wrapper))


@pytest.fixture(scope="module")
def gateway(shared_etcd: EtcdServer, gateway_prefix: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from running_gateway(shared_etcd, gateway_prefix, tmp_path_factory.mktemp("gateway"))


def record(schema: KeySchema, service: ServiceHandle, version: int, instance_id: str, *,
           state: InstanceState = InstanceState.SERVING, model: str = "iris", rest: bool = False) -> tuple[str, str]:
    """(key, value) of an instance record for ``service``, as its registrar would write it (``rest``:
    with the service's REST address)."""
    doc = InstanceRecord(address=service.address, rest_address=f"127.0.0.1:{service.rest_port}" if rest else None,
                         model=model, version=version, instance_id=instance_id, state=state)
    return schema.instance(model, version, instance_id), doc.to_json().decode()


def register(etcd: EtcdServer, schema: KeySchema, service: ServiceHandle, version: int, instance_id: str, *,
             state: InstanceState = InstanceState.SERVING, model: str = "iris", rest: bool = False) -> str:
    key, value = record(schema, service, version, instance_id, state=state, model=model, rest=rest)
    etcd.etcdctl("put", key, value)
    return key


def register_fleet(etcd: EtcdServer, schema: KeySchema, fleet: Fleet, *, rest: bool = False) -> None:
    """Register the fleet as iris v1 twice (``v1-a``, ``v1-b``) and v2 once (``v2-a``); ``rest``:
    with their REST addresses."""
    register(etcd, schema, fleet.v1[0], 1, "v1-a", rest=rest)
    register(etcd, schema, fleet.v1[1], 1, "v1-b", rest=rest)
    register(etcd, schema, fleet.v2[0], 2, "v2-a", rest=rest)


@pytest.fixture(scope="module")
def schema(gateway_prefix: str) -> KeySchema:
    return KeySchema(gateway_prefix)


@pytest.fixture
async def client(shared_etcd: EtcdServer, gateway_prefix: str) -> AsyncIterator[EtcdClient]:
    etcd_client = EtcdClient(EtcdSettings(endpoints=[shared_etcd.endpoint], prefix=gateway_prefix))
    await etcd_client.connect()
    try:
        yield etcd_client
    finally:
        await etcd_client.close()


@pytest.fixture(scope="module")
def registered(shared_etcd: EtcdServer, schema: KeySchema, fleet: Fleet, gateway: GatewayHandle) -> GatewayHandle:
    """The module's gateway once the fleet is registered: iris v1 twice, v2 once."""
    register_fleet(shared_etcd, schema, fleet)
    return gateway
