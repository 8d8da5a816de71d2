"""Stock tritonclient.grpc through the real gateway with NO routing header: the body names the model.

Real etcd, the real ``sluice gateway`` running the real Envoy, real ``sluice serve`` processes:
iris v1 (twice) and v2 from the shared fleet, and an ``mlp`` service, so that the gateway routes
two models and a call without a name could never reach one by default.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from examples.build_models import build_mlp
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.state import set_weights
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.service import ServiceHandle
from tests.gateway.conftest import SERVICE_START_TIMEOUT_S, Fleet, _start_service, register
from tests.gateway.traffic import RPC_TIMEOUT_S, assert_binomial, eventually, iris_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

PROPAGATION_TIMEOUT_S = 15.0
IRIS_ROW = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)


@pytest.fixture(scope="module")
def mlp_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    built = tmp_path_factory.mktemp("mlp-built")
    build_mlp(built)
    repo = tmp_path_factory.mktemp("mlp-repo")
    shutil.copytree(built / "mlp", repo / "mlp")
    handle = _start_service(repo, tmp_path_factory.mktemp("mlp-service"), "mlp-v1")
    try:
        handle.process.wait_until(handle.ready, SERVICE_START_TIMEOUT_S, "ServerReady")
        yield handle
    finally:
        handle.process.stop()


@pytest.fixture(scope="module")
def two_models(shared_etcd: EtcdServer, schema: KeySchema, fleet: Fleet, mlp_service: ServiceHandle,
               registered: GatewayHandle) -> GatewayHandle:
    register(shared_etcd, schema, mlp_service, 1, "mlp-a", model="mlp")
    return registered


@pytest.fixture
def triton_client(two_models: GatewayHandle) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(two_models.address)
    try:
        yield client
    finally:
        client.close()


def iris_inputs() -> list[triton.InferInput]:
    tensor = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(IRIS_ROW)
    return [tensor]


def triton_error(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    try:
        call(*args, **kwargs)
    except InferenceServerException as exc:
        return exc
    pytest.fail(f"{getattr(call, '__name__', call)} succeeded, an error was expected")


async def wait_routed(address: str) -> None:
    """Until both models answer through the gateway (Envoy's health checks passed)."""
    async def check() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                iris = await stub.ModelReady(pb.ModelReadyRequest(name="iris", version="2"), timeout=2)
                mlp = await stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return bool(iris.ready and mlp.ready)

    await eventually(check, PROPAGATION_TIMEOUT_S, "iris and mlp routed by the request body")


async def test_every_model_rpc_routes_on_the_body(two_models: GatewayHandle,
                                                  triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    assert triton_client.is_model_ready("iris", "1")
    assert triton_client.is_model_ready("mlp")
    assert triton_client.get_model_metadata("mlp").name == "mlp"
    assert triton_client.get_model_metadata("iris", "1").versions == ["1"]
    assert triton_client.get_model_config("iris", "2").config.name == "iris"
    stats = triton_client.get_inference_statistics("mlp")
    assert [s.name for s in stats.model_stats] == ["mlp"]


async def test_server_rpcs_without_header_are_answered_by_the_gateway(
        two_models: GatewayHandle, triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.get_server_metadata().name == "sluice-gateway"
    # The index of the whole gateway, not of one instance: every model and version it routes.
    index = triton_client.get_model_repository_index()
    assert sorted((m.name, m.version, m.state) for m in index.models) == [
        ("iris", "1", "READY"), ("iris", "2", "READY"), ("mlp", "1", "READY")]
    # With a model header they still reach that model's service, as before.
    assert triton_client.get_server_metadata(headers={"x-model-name": "mlp"}).name == "sluice"


async def test_infer_pinned_by_model_version_reaches_that_version(
        two_models: GatewayHandle, triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    for version in ("1", "2", "1"):
        result = triton_client.infer("iris", iris_inputs(), model_version=version)
        assert result.get_response().model_version == version
    mlp = triton.InferInput("x", [2, 16], "FP32")
    mlp.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
    answer = triton_client.infer("mlp", [mlp])
    assert answer.get_response().model_name == "mlp"
    assert answer.as_numpy("y").shape == (2, 4)


async def test_stream_routes_on_its_first_message(two_models: GatewayHandle,
                                                  triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    answers: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    triton_client.start_stream(callback=lambda result, error: loop.call_soon_threadsafe(
        answers.put_nowait, (result, error)))
    try:
        for _ in range(3):
            triton_client.async_stream_infer("iris", iris_inputs(), model_version="1")
        versions = []
        for _ in range(3):
            result, error = await asyncio.wait_for(answers.get(), RPC_TIMEOUT_S)
            assert error is None, error
            versions.append(result.get_response().model_version)
        assert versions == ["1", "1", "1"]
    finally:
        triton_client.stop_stream()


async def test_header_that_disagrees_with_the_body_is_refused(
        two_models: GatewayHandle, triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    # Inference: the header routes (cheap path), the service compares it with the body.
    error = triton_error(triton_client.infer, "iris", iris_inputs(), headers={"x-model-name": "mlp"})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'iris'" in error.message() and "'mlp'" in error.message()
    # Other calls: refused by the gateway itself.
    error = triton_error(triton_client.get_model_metadata, "mlp", headers={"x-model-name": "iris"})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model name 'mlp' in the request disagrees with header x-model-name 'iris'" in error.message()
    error = triton_error(triton_client.get_inference_statistics, "", headers={"x-model-name": "iris"})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    # A version header against the body's version, with the name from the body.
    error = triton_error(triton_client.infer, "iris", iris_inputs(), model_version="1",
                         headers={"x-model-version": "2"})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "model version '1' in the request disagrees with header x-model-version '2'" in error.message()
    # Agreeing header and body: fine either way.
    result = triton_client.infer("iris", iris_inputs(), model_version="2", headers={"x-model-version": "2"})
    assert result.get_response().model_version == "2"
    assert triton_client.get_model_metadata("mlp", headers={"x-model-name": "mlp"}).name == "mlp"


async def test_unknown_or_invalid_names_in_the_body(two_models: GatewayHandle,
                                                    triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    error = triton_error(triton_client.infer, "resnet", iris_inputs())
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "served models: iris, mlp" in error.message()
    error = triton_error(triton_client.infer, "iris", iris_inputs(), model_version="9")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "serving versions: 1, 2" in error.message()
    error = triton_error(triton_client.infer, "../etc\r\npasswd", iris_inputs())
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "is invalid" in error.message()
    error = triton_error(triton_client.infer, "iris", iris_inputs(), model_version="01")
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    error = triton_error(triton_client.infer, "x" * 10_000, iris_inputs())
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert len(error.message()) < 600
    # No name anywhere: the gateway says how to name one.
    error = triton_error(triton_client.get_inference_statistics, "")
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "served models: iris, mlp" in error.message()
    # Nothing was taken down.
    assert triton_client.infer("iris", iris_inputs(), model_version="1").get_response().model_version == "1"


async def test_repository_control_is_refused_for_body_named_calls(
        two_models: GatewayHandle, triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    for call in (triton_client.load_model, triton_client.unload_model):
        error = triton_error(call, "iris")
        assert error.status() == "StatusCode.PERMISSION_DENIED"
    assert triton_client.is_model_ready("iris")


async def test_oversized_body_is_refused_without_harm(two_models: GatewayHandle,
                                                      triton_client: triton.InferenceServerClient) -> None:
    await wait_routed(two_models.address)
    request = iris_request()
    # Over the gateway's 64 MiB limit, and over the extraction's own 16 MiB buffer.
    request.raw_input_contents[0] = b"\0" * (65 * 1024 * 1024)
    async with grpc.aio.insecure_channel(two_models.address, options=[
            ("grpc.max_send_message_length", 80 * 1024 * 1024)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request, timeout=30)
        assert "larger than" in (raised.value.details() or "")
        # 20 MiB passes the gateway (buffer first) and is refused by the service on its shape.
        request.raw_input_contents[0] = b"\0" * (20 * 1024 * 1024)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert triton_client.is_model_ready("iris")


async def test_split_without_header_follows_the_weights(two_models: GatewayHandle, client: EtcdClient,
                                                        schema: KeySchema) -> None:
    await wait_routed(two_models.address)
    await set_weights(client, schema, "iris", {1: 80, 2: 20})
    async with grpc.aio.insecure_channel(two_models.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def split_live() -> bool:
            seen = {(await stub.ModelInfer(iris_request(), timeout=RPC_TIMEOUT_S)).model_version
                    for _ in range(40)}
            return seen == {"1", "2"}

        await eventually(split_live, PROPAGATION_TIMEOUT_S, "the 80/20 split live")
        counts: collections.Counter[str] = collections.Counter()
        pending = iter(range(2000))

        async def worker() -> None:
            for _ in pending:
                response = await stub.ModelInfer(iris_request(), timeout=RPC_TIMEOUT_S)  # no metadata
                counts[response.model_version] += 1

        await asyncio.gather(*(worker() for _ in range(16)))
    assert sum(counts.values()) == 2000
    assert_binomial(counts["1"], 2000, 0.8)
