"""Repository control (RepositoryModelLoad/Unload) through the real gateway: refused by default.

Real etcd, two real ``sluice gateway`` processes (running the real Envoy) on their own prefixes,
one with ``--allow-repository-control``, and one real ``sluice serve --repository-control``
behind both. Tests run in
file order: the refusal first (the model must still serve after it), then the allowed unload.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.service import ServiceHandle
from tests.gateway.conftest import gateway_serving, repository_control_service
from tests.gateway.traffic import count_versions, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

ROUTABLE_TIMEOUT_S = 15.0
HEADER = (("x-model-name", "iris"),)


@pytest.fixture(scope="module")
def service(iris_repos: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    # The service's own switch is on, so that what the gateway does is all that is tested here.
    yield from repository_control_service(iris_repos[1], tmp_path_factory.mktemp("repository-control"), "iris-v1")


@pytest.fixture(scope="module")
def closed_gateway(shared_etcd: EtcdServer, gateway_prefix: str, service: ServiceHandle,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, f"{gateway_prefix}closed/", tmp_path_factory.mktemp("gw-closed"),
                               service)


@pytest.fixture(scope="module")
def open_gateway(shared_etcd: EtcdServer, gateway_prefix: str, service: ServiceHandle,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    yield from gateway_serving(shared_etcd, f"{gateway_prefix}open/", tmp_path_factory.mktemp("gw-open"), service,
                               "--allow-repository-control")


async def _wait_routable(gateway: GatewayHandle) -> None:
    async def routable() -> bool:
        try:
            return sum((await count_versions(gateway.address, 1, HEADER, concurrency=1)).values()) == 1
        except grpc.aio.AioRpcError:
            return False

    await eventually(routable, ROUTABLE_TIMEOUT_S, "iris routable through the gateway")


def _model_ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return bool(stub.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=5).ready)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise


async def _unload(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="iris"), metadata=HEADER,
                                         timeout=10)


async def _load(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), metadata=HEADER,
                                       timeout=30)


def _rest(address: str, path: str) -> tuple[int, str]:
    """(status, error text or "") of a POST with an empty JSON body."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body=b"{}", headers={"content-type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw)["error"] if raw else ""
    finally:
        connection.close()


async def test_repository_control_through_the_gateway_is_refused_and_the_model_keeps_serving(
        closed_gateway: GatewayHandle, service: ServiceHandle) -> None:
    await _wait_routable(closed_gateway)
    for call in (_unload, _unload, _load):  # the reported attack sent Unload twice
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(closed_gateway.address)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = caught.value.details() or ""
        assert "not allowed through the gateway" in details and "--allow-repository-control" in details
    # Spelled differently, the path still names the method once normalised: still refused.
    for path in ("/inference.GRPCInferenceService//RepositoryModelUnload",
                 "/inference.GRPCInferenceService/RepositoryModel%55nload"):
        async with grpc.aio.insecure_channel(closed_gateway.address) as channel:
            unload = channel.unary_unary(path, request_serializer=pb.RepositoryModelUnloadRequest.SerializeToString,
                                         response_deserializer=pb.RepositoryModelUnloadResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unload(pb.RepositoryModelUnloadRequest(model_name="iris"), metadata=HEADER, timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, path
    # And over REST, spelled any way.
    for path in ("/v2/repository/models/iris/unload", "/v2/repository/models/iris/load",
                 "/v2//repository/models/iris/unload", "/v2/repository/models/iris/%75nload"):
        status, error = await asyncio.to_thread(_rest, closed_gateway.address, path)
        assert status == 403 and "--allow-repository-control" in error, (path, status, error)
    assert _model_ready(service.address)
    counts = await count_versions(closed_gateway.address, 20, HEADER, concurrency=4)
    assert counts == {"1": 20}


async def test_with_the_setting_on_repository_control_reaches_the_service(
        open_gateway: GatewayHandle, service: ServiceHandle) -> None:
    await _wait_routable(open_gateway)
    await _unload(open_gateway.address)
    # The service itself did it: its own answer (not the gateway's) says the model is gone.
    assert not _model_ready(service.address)
    await _load(open_gateway.address)
    assert _model_ready(service.address)


async def test_with_the_setting_on_rest_repository_control_reaches_the_service(
        open_gateway: GatewayHandle, service: ServiceHandle) -> None:
    await _wait_routable(open_gateway)
    assert (await asyncio.to_thread(_rest, open_gateway.address, "/v2/repository/models/iris/unload"))[0] == 200
    assert not _model_ready(service.address)
    assert (await asyncio.to_thread(_rest, open_gateway.address, "/v2/repository/models/iris/load"))[0] == 200
    assert _model_ready(service.address)
    status, error = await asyncio.to_thread(_rest, open_gateway.address, "/v2/repository/models/resnet/load")
    assert status == 404 and "served models: iris" in error
