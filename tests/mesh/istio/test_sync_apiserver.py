"""mesh-sync against a real kube-apiserver: the chart's VirtualService, Role and RoleBinding are
created in it, mesh-sync authenticates with a token of the chart's ServiceAccount, and its guarded
JSON patches meet the API server's own concurrency and RBAC checks.

Skipped (with the reason) when the API server was not built on this machine: `bash
charts/tools/build-kube-apiserver.sh` builds it once (~9 minutes) into a per-machine cache.
Not covered here: Istio itself (the CRD is installed without Istio's schema, which
tests/charts validates offline; no pilot turns the VirtualService into Envoy config).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from mesh.istio.plan import ANNOTATION_HELD, Action, plan_sync, read_weighted_route
from mesh.istio.sync import KubernetesVirtualServices, MeshSync, MeshSyncSettings, PatchConflictError
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.state import build_model, set_weights
from tests.fixtures.etcd import EtcdServer
from tests.mesh.helpers import eventually
from tests.mesh.istio.kube_apiserver import VIRTUAL_SERVICE_CRD, KubeApiServer, apiserver_binary, run_apiserver
from tests.mesh.istio.test_sync import register, status_of, track_passes

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NAMESPACE = "models"
VS_NAME = "demo-sluice-iris"
SERVICE_ACCOUNT = "demo-sluice-mesh-sync"


def chart_objects() -> list[dict[str, Any]]:
    """What the chart renders for iris v1 (90) + v2 (10), or skip when helm is missing."""
    from tests.charts.helpers import HelmUnavailableError, documents, render

    try:
        rendered = render(None, "models[0].name=iris", "models[0].versions[0].version=1",
                          "models[0].versions[0].weight=90", "models[0].versions[1].version=2",
                          "models[0].versions[1].weight=10")
    except HelmUnavailableError as exc:
        pytest.skip(f"helm cannot be installed on this machine: {exc}")
    return documents(rendered)


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory, shared_etcd: EtcdServer) -> Iterator[KubeApiServer]:
    apiserver_binary()  # skip early, before anything starts
    with run_apiserver(tmp_path_factory.mktemp("kube"), shared_etcd) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(apiserver: KubeApiServer) -> dict[str, Any]:
    """The CRD, the namespace and the chart's mesh-sync RBAC objects; returns the admin API client."""
    from kubernetes import client, utils

    admin = apiserver.admin_client()
    client.ApiextensionsV1Api(admin).create_custom_resource_definition(VIRTUAL_SERVICE_CRD)
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": NAMESPACE}})
    objects = chart_objects()
    for obj in objects:
        if obj["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            utils.create_from_dict(admin, obj, namespace=NAMESPACE)
    virtual_service = next(o for o in objects if o["kind"] == "VirtualService")
    custom = client.CustomObjectsApi(admin)
    for _ in range(50):  # the CRD takes a moment to be served
        with contextlib.suppress(client.exceptions.ApiException):
            custom.list_namespaced_custom_object("networking.istio.io", "v1", NAMESPACE, "virtualservices")
            break
        time.sleep(0.2)
    token = client.CoreV1Api(admin).create_namespaced_service_account_token(
        SERVICE_ACCOUNT, NAMESPACE, {"spec": {"audiences": ["https://kubernetes.default.svc"]}}).status.token
    return {"admin": admin, "virtual_service": virtual_service,
            "kubeconfig": apiserver.kubeconfig(token, "mesh-sync")}


@pytest.fixture
def fresh_virtual_service(cluster: dict[str, Any]) -> dict[str, Any]:
    """The chart's VirtualService, (re)created as rendered."""
    from kubernetes import client

    custom = client.CustomObjectsApi(cluster["admin"])
    with contextlib.suppress(client.exceptions.ApiException):
        custom.delete_namespaced_custom_object("networking.istio.io", "v1", NAMESPACE, "virtualservices", VS_NAME)
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        "networking.istio.io", "v1", NAMESPACE, "virtualservices", cluster["virtual_service"])
    return created


def admin_get(cluster: dict[str, Any]) -> dict[str, Any]:
    from kubernetes import client

    result: dict[str, Any] = client.CustomObjectsApi(cluster["admin"]).get_namespaced_custom_object(
        "networking.istio.io", "v1", NAMESPACE, "virtualservices", VS_NAME)
    return result


def admin_set_weights(cluster: dict[str, Any], weights: dict[int, int]) -> None:
    """`kubectl edit`: a full update of the object (resourceVersion-checked, like kubectl's)."""
    from kubernetes import client

    obj = admin_get(cluster)
    for item in obj["spec"]["http"][-1]["route"]:
        item["weight"] = weights[int(item["destination"]["subset"][1:])]
    client.CustomObjectsApi(cluster["admin"]).replace_namespaced_custom_object(
        "networking.istio.io", "v1", NAMESPACE, "virtualservices", VS_NAME, obj)


def weights_of(obj: dict[str, Any]) -> dict[int, int]:
    return read_weighted_route(obj).weights


def test_chart_rbac_allows_get_and_patch_of_its_virtual_services_only(cluster: dict[str, Any],
                                                                      fresh_virtual_service: dict[str, Any]) -> None:
    from kubernetes import client, config

    as_sync = config.new_client_from_config(config_file=str(cluster["kubeconfig"]))
    service = KubernetesVirtualServices(NAMESPACE, kubeconfig=cluster["kubeconfig"])
    assert weights_of(service.get(VS_NAME)) == {1: 90, 2: 10}
    custom = client.CustomObjectsApi(as_sync)
    with pytest.raises(client.exceptions.ApiException) as denied:
        custom.list_namespaced_custom_object("networking.istio.io", "v1", NAMESPACE, "virtualservices")
    assert denied.value.status == 403
    with pytest.raises(client.exceptions.ApiException) as denied:
        custom.delete_namespaced_custom_object("networking.istio.io", "v1", NAMESPACE, "virtualservices", VS_NAME)
    assert denied.value.status == 403
    with pytest.raises(client.exceptions.ApiException) as denied:
        client.CoreV1Api(as_sync).list_namespaced_secret(NAMESPACE)
    assert denied.value.status == 403


def test_guarded_patch_applies_and_a_stale_one_is_refused(cluster: dict[str, Any],
                                                          fresh_virtual_service: dict[str, Any]) -> None:
    schema = KeySchema("/x/")
    service = KubernetesVirtualServices(NAMESPACE, kubeconfig=cluster["kubeconfig"])
    state = _model_state(schema, {1: 1, 2: 3}, revision=5)
    stale = service.get(VS_NAME)
    plan = plan_sync(state, stale)
    admin_set_weights(cluster, {1: 20, 2: 80})  # someone else, between our read and our patch
    with pytest.raises(PatchConflictError, match="changed concurrently"):
        service.patch(VS_NAME, plan.patch)
    assert weights_of(admin_get(cluster)) == {1: 20, 2: 80}  # not overwritten

    # Without the resourceVersion guard the weights guard alone still refuses it.
    unguarded = [op for op in plan.patch if op["path"] != "/metadata/resourceVersion"]
    with pytest.raises(PatchConflictError):
        service.patch(VS_NAME, unguarded)

    # Re-planned from a fresh read, the edit shows as weights changed outside etcd: held, kept.
    fresh = service.get(VS_NAME)
    replanned = plan_sync(_model_state(schema, {1: 1, 2: 3}, revision=5), fresh)
    assert replanned.action is Action.HOLD
    held = service.patch(VS_NAME, replanned.patch)
    assert weights_of(held) == {1: 20, 2: 80}
    assert held["metadata"]["annotations"][ANNOTATION_HELD] == "5"
    # A newer routing document takes over.
    newer = plan_sync(_model_state(schema, {1: 1, 2: 3}, revision=9), held)
    assert newer.action is Action.PATCH
    updated = service.patch(VS_NAME, newer.patch)
    assert weights_of(updated) == {1: 25, 2: 75}
    assert updated["metadata"]["resourceVersion"] != held["metadata"]["resourceVersion"]


def test_a_json_patch_list_needs_its_content_type(cluster: dict[str, Any],
                                                  fresh_virtual_service: dict[str, Any]) -> None:
    """The pitfall KubernetesVirtualServices.patch avoids: without the content type, a 4xx, not a patch."""
    from kubernetes import client

    ops = [{"op": "test", "path": "/metadata/name", "value": VS_NAME}]
    custom = client.CustomObjectsApi(cluster["admin"])
    with pytest.raises(client.exceptions.ApiException) as refused:
        custom.patch_namespaced_custom_object("networking.istio.io", "v1", NAMESPACE, "virtualservices", VS_NAME, ops)
    assert 400 <= refused.value.status < 500
    custom.patch_namespaced_custom_object("networking.istio.io", "v1", NAMESPACE, "virtualservices", VS_NAME, ops,
                                          _content_type="application/json-patch+json")


@pytest.fixture
async def sync_loop(cluster: dict[str, Any], client: EtcdClient,
                    fresh_virtual_service: dict[str, Any]) -> AsyncIterator[tuple[MeshSync, KubernetesVirtualServices]]:
    settings = MeshSyncSettings(virtual_services={"iris": VS_NAME}, namespace=NAMESPACE,
                                kubeconfig=cluster["kubeconfig"], resync_interval=0.5, debounce_ms=10, metrics_port=-1)
    service = KubernetesVirtualServices(NAMESPACE, kubeconfig=cluster["kubeconfig"])
    sync = MeshSync(settings, client, service)
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    try:
        yield sync, service
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


@pytest.mark.timeout(60)
async def test_mesh_sync_end_to_end(cluster: dict[str, Any], client: EtcdClient, schema: KeySchema,
                                    sync_loop: tuple[MeshSync, KubernetesVirtualServices]) -> None:
    sync, service = sync_loop
    await register(client, schema, 1, 2)
    first = await set_weights(client, schema, "iris", {1: 50, 2: 50})
    await eventually(lambda: _is(weights_of(admin_get(cluster)) == {1: 50, 2: 50}), 15, "50/50 via the API server")
    await eventually(lambda: _status_weights(client, schema, {1: 50, 2: 50}), 10, "status 50/50")

    # A concurrent edit slipped in between mesh-sync's read and its patch: refused by the API
    # server, re-read, held and reported; the edit stays.
    original_get = service.get
    pass_revision = track_passes(sync)

    def get_then_someone_edits(name: str) -> dict[str, Any]:
        obj = original_get(name)
        if pass_revision[0] <= first.revision:
            return obj  # a periodic pass on the 50/50 document: wait for the 80/20 one
        service.get = original_get  # type: ignore[method-assign]
        admin_set_weights(cluster, {1: 10, 2: 90})
        return obj

    service.get = get_then_someone_edits  # type: ignore[method-assign]
    await set_weights(client, schema, "iris", {1: 80, 2: 20})
    await eventually(lambda: _status_error(client, schema, "changed outside etcd"), 15, "the edit reported")
    current = admin_get(cluster)
    assert weights_of(current) == {1: 10, 2: 90}
    assert current["metadata"]["annotations"][ANNOTATION_HELD]
    status = await status_of(client, schema)
    assert status is not None and status.effective_weights == {1: 10, 2: 90}

    # The next routing write takes over again.
    await set_weights(client, schema, "iris", {1: 100, 2: 0})
    await eventually(lambda: _is(weights_of(admin_get(cluster)) == {1: 100, 2: 0}), 15, "etcd takes over")
    await eventually(lambda: _status_weights(client, schema, {1: 100, 2: 0}), 10, "status 100/0")


def _model_state(schema: KeySchema, weights: dict[int, int], revision: int) -> Any:
    from mesh.registry.etcd import KeyValue
    from mesh.registry.records import InstanceRecord, RoutingDocument

    entries = {}
    for version in (1, 2):
        record = InstanceRecord(address="10.0.0.1:8001", model="iris", version=version, instance_id="a")
        key = schema.instance("iris", version, "a").encode()
        entries[key] = KeyValue(key, record.to_json(), 1, 1, 1, 0)
    key = schema.routing("iris").encode()
    entries[key] = KeyValue(key, RoutingDocument.from_weights(weights).to_json(), revision, revision, 1, 0)
    return build_model(schema, "iris", entries)


async def _is(value: bool) -> bool:
    return value


async def _status_weights(client: EtcdClient, schema: KeySchema, weights: dict[int, int]) -> bool:
    status = await status_of(client, schema)
    return status is not None and status.effective_weights == weights and not status.errors


async def _status_error(client: EtcdClient, schema: KeySchema, text: str) -> bool:
    status = await status_of(client, schema)
    return status is not None and any(text in error for error in status.errors)

