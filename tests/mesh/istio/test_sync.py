"""The mesh-sync loop against a real etcd; VirtualServices in an in-memory store that applies JSON
patches with the API server's rules (``test`` ops, resourceVersion bump). The same loop against a
real kube-apiserver is in test_sync_apiserver.py."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mesh.errors import MeshError
from mesh.istio.plan import ANNOTATION_HELD, IstioError, apply_json_patch, read_weighted_route
from mesh.istio.sync import MeshSync, MeshSyncSettings, PatchConflictError, SyncMetrics, VirtualServiceNotFoundError
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, StatusDocument
from mesh.registry.state import set_weights
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.service import sluice_argv
from tests.mesh.conftest import settings_for
from tests.mesh.helpers import eventually
from tests.mesh.istio.test_plan import virtual_service

VS_NAME = "demo-sluice-iris"


class MemoryVirtualServices:
    """A namespace's VirtualServices as the API server treats JSON patches (atomic, all-or-nothing)."""

    namespace = "models"

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.patches: list[list[dict[str, Any]]] = []
        self.after_get: Callable[[str], None] | None = None
        """Runs after a get returned: lets a test slip a concurrent edit in before the patch."""

    def get(self, name: str) -> dict[str, Any]:
        with self.lock:
            if name not in self.objects:
                raise VirtualServiceNotFoundError(f"VirtualService models/{name} not found")
            result = copy.deepcopy(self.objects[name])
        if self.after_get is not None:
            self.after_get(name)
        return result

    def patch(self, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            self.patches.append(operations)
            try:
                updated = apply_json_patch(self.objects[name], operations)
            except IstioError as exc:
                raise PatchConflictError(str(exc)) from exc
            return copy.deepcopy(self._store(name, updated))

    def edit(self, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        """What `kubectl edit` does: change the object, bump its resourceVersion."""
        with self.lock:
            updated = copy.deepcopy(self.objects[name])
            change(updated)
            self._store(name, updated)

    def _store(self, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        previous = int(self.objects.get(name, {}).get("metadata", {}).get("resourceVersion", "0"))
        obj["metadata"]["resourceVersion"] = str(previous + 1)
        self.objects[name] = obj
        return obj

    def weights(self, name: str = VS_NAME) -> dict[int, int]:
        with self.lock:
            return read_weighted_route(self.objects[name]).weights


async def register(client: EtcdClient, schema: KeySchema, *versions: int) -> None:
    for version in versions:
        record = InstanceRecord(address=f"10.0.0.{version}:8001", model="iris", version=version,
                                instance_id=f"pod-{version}")
        await client.put(schema.instance("iris", version, record.instance_id), record.to_json())


async def status_of(client: EtcdClient, schema: KeySchema) -> StatusDocument | None:
    kv = await client.get(schema.status("iris"))
    return None if kv is None else StatusDocument.from_json(kv.value)


def track_passes(sync: MeshSync) -> list[int]:
    """Record the routing revision each sync pass plans from (the returned list's one item).

    A test that slips an edit in between a pass's read and its patch must pick the pass planning
    the new document: a periodic pass still on the older one would hold at that older revision,
    and the new document (newer than the hold) would then rightly take over.
    """
    pass_revision = [0]
    original_sync = sync.sync_model

    async def recording_sync(model: str) -> StatusDocument:
        state = sync.state.model(model) if sync.state else None
        pass_revision[0] = state.routing_revision if state else 0
        return await original_sync(model)  # reads sync.state before its first await, as above

    sync.sync_model = recording_sync  # type: ignore[method-assign]
    return pass_revision


@pytest.fixture
def store() -> MemoryVirtualServices:
    memory = MemoryVirtualServices()
    memory.objects[VS_NAME] = virtual_service({1: 90, 2: 10}, resource_version="1")
    return memory


@pytest.fixture
async def running(client: EtcdClient, store: MemoryVirtualServices) -> AsyncIterator[MeshSync]:
    settings = MeshSyncSettings(virtual_services={"iris": VS_NAME}, namespace="models", resync_interval=0.5,
                                debounce_ms=10, metrics_port=-1)
    sync = MeshSync(settings, client, store, SyncMetrics())
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        yield sync
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)


@pytest.mark.timeout(30)
async def test_routing_document_reaches_the_virtual_service(client: EtcdClient, schema: KeySchema,
                                                            store: MemoryVirtualServices, running: MeshSync) -> None:
    await register(client, schema, 1, 2)
    # No routing document yet: the chart's weights stay, and status says why.
    await eventually(lambda: _has_status(client, schema, "no routing document"), 10, "status without routing")
    assert store.weights() == {1: 90, 2: 10}

    change = await set_weights(client, schema, "iris", {1: 1, 2: 1})
    await eventually(lambda: _async(store.weights() == {1: 50, 2: 50}), 10, "weights 50/50 in the VirtualService")
    status = await _wait_status(client, schema, lambda s: s.effective_weights == {1: 50, 2: 50})
    assert status.errors == [] and status.applied_revision >= change.revision
    assert (status.routing_revision, status.routing_source) == (change.revision, "document")
    assert status.routing == change.after
    assert status.envoy_config_version.startswith(f"VirtualService models/{VS_NAME}@")
    annotations = store.objects[VS_NAME]["metadata"]["annotations"]
    assert annotations["sluice.io/routing-revision"] == str(change.revision)


@pytest.mark.timeout(30)
async def test_version_without_instances_gets_no_traffic(client: EtcdClient, schema: KeySchema,
                                                         store: MemoryVirtualServices, running: MeshSync) -> None:
    await register(client, schema, 1)
    await set_weights(client, schema, "iris", {1: 50, 2: 50})
    await eventually(lambda: _async(store.weights() == {1: 100, 2: 0}), 10, "all traffic to version 1")
    status = await _wait_status(client, schema, lambda s: s.effective_weights == {1: 100, 2: 0})
    assert status.warnings == ["version 2 has weight 50 but no serving instances"]
    # Version 2 comes up: its share follows.
    await register(client, schema, 2)
    await eventually(lambda: _async(store.weights() == {1: 50, 2: 50}), 10, "version 2 back in the split")


@pytest.mark.timeout(30)
async def test_concurrent_edit_is_detected_not_overwritten(client: EtcdClient, schema: KeySchema,
                                                           store: MemoryVirtualServices, running: MeshSync) -> None:
    await register(client, schema, 1, 2)
    first = await set_weights(client, schema, "iris", {1: 90, 2: 10})
    await _wait_status(client, schema, lambda s: s.effective_weights == {1: 90, 2: 10})

    # The operator's edit must land inside the pass that plans the 60/40 document (see track_passes).
    pass_revision = track_passes(running)

    def operator_edits_weights(name: str) -> None:
        if pass_revision[0] <= first.revision:
            return  # an older pass: stay armed
        store.after_get = None  # once
        store.edit(name, lambda obj: _set_weights(obj, {1: 20, 2: 80}))

    store.after_get = operator_edits_weights  # lands between mesh-sync's read and its patch
    await set_weights(client, schema, "iris", {1: 60, 2: 40})
    status = await _wait_status(client, schema, lambda s: any("changed outside etcd" in e for e in s.errors))
    assert store.weights() == {1: 20, 2: 80}  # the operator's edit survived
    assert status.effective_weights == {1: 20, 2: 80}
    refused = [p for p in store.patches if any(op["path"].endswith("/weight") and op["value"] == 60 for op in p)]
    assert refused, "mesh-sync never tried the 60/40 patch"
    assert store.objects[VS_NAME]["metadata"]["annotations"][ANNOTATION_HELD]

    # Periodic passes leave the edit alone...
    await asyncio.sleep(1.2)
    assert store.weights() == {1: 20, 2: 80}
    # ...until someone writes weights to etcd again.
    await set_weights(client, schema, "iris", {1: 70, 2: 30})
    await eventually(lambda: _async(store.weights() == {1: 70, 2: 30}), 10, "etcd taking over again")
    status = await _wait_status(client, schema, lambda s: s.effective_weights == {1: 70, 2: 30})
    assert status.errors == []


@pytest.mark.timeout(30)
async def test_edit_of_other_fields_is_kept(client: EtcdClient, schema: KeySchema, store: MemoryVirtualServices,
                                            running: MeshSync) -> None:
    await register(client, schema, 1, 2)

    def someone_adds_a_fault(name: str) -> None:
        store.after_get = None
        store.edit(name, lambda obj: obj["spec"]["http"][-1].update({"fault": {"delay": {"fixedDelay": "1s"}}}))

    store.after_get = someone_adds_a_fault
    await set_weights(client, schema, "iris", {1: 1, 2: 3})
    await eventually(lambda: _async(store.weights() == {1: 25, 2: 75}), 10, "25/75 after the retry")
    assert store.objects[VS_NAME]["spec"]["http"][-1]["fault"] == {"delay": {"fixedDelay": "1s"}}


@pytest.mark.timeout(30)
async def test_missing_virtual_service_is_reported(client: EtcdClient, schema: KeySchema,
                                                   store: MemoryVirtualServices, running: MeshSync) -> None:
    del store.objects[VS_NAME]
    await register(client, schema, 1)
    status = await _wait_status(client, schema, lambda s: bool(s.errors))
    assert status.errors == [f"cannot read the VirtualService: VirtualService models/{VS_NAME} not found"]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_follows_an_etcd_that_lost_its_data(etcd: EtcdServer, store: MemoryVirtualServices) -> None:
    """Wiped and restarted on the same port, etcd is at a lower revision than mesh-sync's watch:
    a routing document written afterwards must still reach the VirtualService, with its status."""
    settings = MeshSyncSettings(virtual_services={"iris": VS_NAME}, namespace="models", resync_interval=0.5,
                                debounce_ms=10, metrics_port=-1)
    etcd_settings = settings_for(etcd, "/wiped/")
    schema = KeySchema(etcd_settings.prefix)
    async with EtcdClient(etcd_settings) as client:
        sync = MeshSync(settings, client, store, SyncMetrics())
        stop = asyncio.Event()
        task = asyncio.create_task(sync.run(stop))
        try:
            await register(client, schema, 1, 2)
            await set_weights(client, schema, "iris", {1: 1, 2: 1})
            await eventually(lambda: _async(store.weights() == {1: 50, 2: 50}), 10, "50/50 before the wipe")
            for index in range(30):  # the old revision, well above what the new etcd reaches here
                await client.put(f"/filler/{index}", b"x")

            etcd.wipe_and_restart()
            await eventually(lambda: _register_again(client, schema), 20, "etcd back")
            await set_weights(client, schema, "iris", {2: 100})
            await eventually(lambda: _async(store.weights() == {1: 0, 2: 100}), 20,
                             "the document written after the wipe in the VirtualService")
            status = await _wait_status(client, schema, lambda s: s.effective_weights == {1: 0, 2: 100})
            assert status.errors == []
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)


async def _register_again(client: EtcdClient, schema: KeySchema) -> bool:
    await register(client, schema, 1, 2)
    return True


def test_settings_parse_pairs_and_reject_bad_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_MESH_SYNC_VIRTUAL_SERVICES", "iris=demo-iris, mlp=demo-mlp")
    assert MeshSyncSettings().virtual_services == {"iris": "demo-iris", "mlp": "demo-mlp"}
    assert MeshSyncSettings(virtual_services=["a=b"]).virtual_services == {"a": "b"}
    with pytest.raises(ValueError, match="is not MODEL=VIRTUALSERVICE"):
        MeshSyncSettings(virtual_services="iris")
    with pytest.raises(ValueError, match="model name"):
        MeshSyncSettings(virtual_services="bad/name=x")


def test_cli_reports_invalid_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.cli import main

    assert main(["mesh-sync", "--virtual-service", "iris"]) == 2
    assert "is not MODEL=VIRTUALSERVICE" in capsys.readouterr().out


@pytest.mark.timeout(90)
def test_cli_taken_metrics_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            sluice_argv("mesh-sync", "--virtual-service", "iris=vs", "--namespace", "models", "--metrics-host",
                        "127.0.0.1", "--metrics-port", str(port), "--etcd", "127.0.0.1:1", "--log-format", "json"),
            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"sluice mesh-sync: cannot listen on 127.0.0.1:{port} for metrics: Address already in use; "
        "choose another port with --metrics-port (-1 turns metrics off)"]


def _set_weights(obj: dict[str, Any], weights: dict[int, int]) -> None:
    for item in obj["spec"]["http"][-1]["route"]:
        item["weight"] = weights[int(item["destination"]["subset"][1:])]


async def _async(value: bool) -> bool:
    return value


async def _has_status(client: EtcdClient, schema: KeySchema, text: str) -> bool:
    status = await status_of(client, schema)
    return status is not None and any(text in w for w in [*status.warnings, *status.errors])


async def _wait_status(client: EtcdClient, schema: KeySchema,
                       predicate: Callable[[StatusDocument], bool]) -> StatusDocument:
    found: list[StatusDocument] = []

    async def check() -> bool:
        try:
            status = await status_of(client, schema)
        except MeshError:
            return False
        if status is not None and predicate(status):
            found.append(status)
            return True
        return False

    await eventually(check, 10, "status document")
    return found[-1]
