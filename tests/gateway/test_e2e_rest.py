"""KServe v2 REST through the real gateway, with no routing header: the path names the model.

Real etcd, the real ``sluice gateway`` running the real Envoy, real ``sluice serve`` processes
(the shared fleet: iris v1 twice, v2 once) with REST on, their records written by the test (as
everywhere in tests/gateway) with the ``rest_address`` a registrar writes. The expected outputs
come from ONNX Runtime in this process on the same model files.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http

from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, InstanceState, StatusDocument
from mesh.registry.state import set_weights
from tests.fixtures.envoy import GatewayHandle, start_gateway
from tests.fixtures.etcd import EtcdServer
from tests.gateway.conftest import Fleet, register_fleet
from tests.gateway.traffic import assert_binomial, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

PROPAGATION_TIMEOUT_S = 20.0
HTTP_TIMEOUT_S = 10.0
ROW = [[5.1, 3.5, 1.4, 0.2]]
INFER_BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}).encode()


@pytest.fixture(scope="module")
def rest_gateway(shared_etcd: EtcdServer, schema: KeySchema, fleet: Fleet, gateway: GatewayHandle) -> GatewayHandle:
    register_fleet(shared_etcd, schema, fleet, rest=True)
    return gateway


def call(address: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    """(status, content-type, JSON body or None) of one HTTP/1.1 request."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        return response.status, response.getheader("content-type", ""), json.loads(raw) if raw else None
    finally:
        connection.close()


async def acall(address: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    return await asyncio.to_thread(call, address, method, path, body, headers)


async def wait_rest_routed(address: str) -> None:
    async def routed() -> bool:
        status, _, index = await acall(address, "POST", "/v2/repository/index", b"{}")
        if status != 200 or [(m["name"], m["version"]) for m in index] != [("iris", "1"), ("iris", "2")]:
            return False
        pinned = [await acall(address, "POST", f"/v2/models/iris/versions/{v}/infer", INFER_BODY) for v in (1, 2)]
        return all(status == 200 for status, _, _ in pinned)

    await eventually(routed, PROPAGATION_TIMEOUT_S, "iris v1 and v2 answering REST through the gateway")


async def read_status(client: EtcdClient, schema: KeySchema, model: str) -> StatusDocument | None:
    kv = await client.get(schema.status(model))
    return None if kv is None else StatusDocument.from_json(kv.value)


def expected(repos: dict[int, Path], version: int) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repos[version] / "iris" / str(version) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": np.array(ROW, dtype=np.float32)}), strict=True))


@pytest.fixture
def http_client(rest_gateway: GatewayHandle) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(rest_gateway.address, network_timeout=HTTP_TIMEOUT_S)
    try:
        yield client
    finally:
        client.close()


async def test_curl_style_json_infer_without_header_matches_onnx_runtime(
        rest_gateway: GatewayHandle, client: EtcdClient, schema: KeySchema, iris_repos: dict[int, Path]) -> None:
    await set_weights(client, schema, "iris", {1: 100})
    await wait_rest_routed(rest_gateway.address)

    async def on_v1() -> bool:
        doc = (await acall(rest_gateway.address, "POST", "/v2/models/iris/infer", INFER_BODY))[2]
        return bool(doc["model_version"] == "1")

    await eventually(on_v1, PROPAGATION_TIMEOUT_S, "all REST traffic on version 1")

    async def confirmed() -> bool:  # the gateway confirmed the snapshot with its REST clusters live in Envoy
        document = await read_status(client, schema, "iris")
        return document is not None and document.effective_weights == {1: 100} \
            and bool(document.envoy_config_version)

    await eventually(confirmed, PROPAGATION_TIMEOUT_S, "the status document with weights 1=100")
    document = await read_status(client, schema, "iris")
    assert document is not None and document.errors == [] and document.warnings == []
    status, content_type, doc = await acall(rest_gateway.address, "POST", "/v2/models/iris/infer", INFER_BODY)
    assert status == 200 and content_type.startswith("application/json")
    want = expected(iris_repos, 1)
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
    assert set(outputs) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-6)


async def test_tritonclient_http_pins_with_its_own_model_version(
        rest_gateway: GatewayHandle, http_client: triton_http.InferenceServerClient,
        iris_repos: dict[int, Path]) -> None:
    await wait_rest_routed(rest_gateway.address)
    # Called on this thread: the client runs on gevent, which refuses to switch between threads.
    for version in (1, 2):
        tensor = triton_http.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array(ROW, dtype=np.float32), binary_data=True)
        result = http_client.infer("iris", [tensor], model_version=str(version))
        assert result.get_response()["model_version"] == str(version)
        for name, value in expected(iris_repos, version).items():
            np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-6)
        assert http_client.is_model_ready("iris", str(version))
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    metadata = http_client.get_model_metadata("iris")
    assert metadata["name"] == "iris"


async def test_split_over_rest_follows_the_weights(rest_gateway: GatewayHandle, client: EtcdClient,
                                                   schema: KeySchema) -> None:
    await wait_rest_routed(rest_gateway.address)
    await set_weights(client, schema, "iris", {1: 80, 2: 20})

    async def split_live() -> bool:
        seen = {(await acall(rest_gateway.address, "POST", "/v2/models/iris/infer", INFER_BODY))[2]["model_version"]
                for _ in range(40)}
        return seen == {"1", "2"}

    await eventually(split_live, PROPAGATION_TIMEOUT_S, "the 80/20 REST split live")
    host, _, port = rest_gateway.address.rpartition(":")

    def worker(count: int) -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        connection = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT_S)  # kept alive
        try:
            for _ in range(count):
                connection.request("POST", "/v2/models/iris/infer", body=INFER_BODY,
                                   headers={"content-type": "application/json"})
                response = connection.getresponse()
                raw = response.read()
                assert response.status == 200, raw
                seen[json.loads(raw)["model_version"]] += 1
        finally:
            connection.close()
        return seen

    with ThreadPoolExecutor(8) as pool:
        parts = await asyncio.gather(*(asyncio.wrap_future(pool.submit(worker, 250)) for _ in range(8)))
    counts = sum(parts, collections.Counter[str]())
    assert sum(counts.values()) == 2000 and set(counts) == {"1", "2"}
    assert_binomial(counts["2"], 2000, 0.2)


async def test_sticky_header_keeps_each_rest_key_on_one_version(rest_gateway: GatewayHandle, client: EtcdClient,
                                                                 schema: KeySchema) -> None:
    await wait_rest_routed(rest_gateway.address)
    await set_weights(client, schema, "iris", {1: 50, 2: 50}, sticky_header="x-user")
    try:
        address = rest_gateway.address

        async def versions(user: str, count: int) -> set[str]:
            answers = [await acall(address, "POST", "/v2/models/iris/infer", INFER_BODY, {"x-user": user})
                       for _ in range(count)]
            return {doc["model_version"] for _, _, doc in answers}

        async def sticky_live() -> bool:  # some keys on each version, each key on one
            seen = [await versions(f"user-{i}", 3) for i in range(12)]
            return all(len(v) == 1 for v in seen) and set().union(*seen) == {"1", "2"}

        await eventually(sticky_live, PROPAGATION_TIMEOUT_S, "the sticky 50/50 REST split live")
        for i in range(20):
            assert len(await versions(f"key-{i}", 5)) == 1, f"key-{i} reached both versions"
    finally:  # later tests of the module expect the plain 80/20 split
        await set_weights(client, schema, "iris", {1: 80, 2: 20}, sticky_header="")


async def test_refusals_and_gateway_answers(rest_gateway: GatewayHandle) -> None:
    address = rest_gateway.address
    await wait_rest_routed(address)
    status, content_type, doc = await acall(address, "POST", "/v2/models/resnet/infer", INFER_BODY)
    assert status == 404 and content_type == "application/json" and "served models: iris" in doc["error"]
    status, _, doc = await acall(address, "POST", "/v2/models/iris/versions/9/infer", INFER_BODY)
    assert status == 404 and "serving versions: 1, 2" in doc["error"]
    status, _, doc = await acall(address, "POST", "/v2/repository/models/iris/unload", b"{}")
    assert status == 403 and "repository control is off" in doc["error"]
    assert (await acall(address, "GET", "/v2/health/live"))[0] == 200
    assert (await acall(address, "GET", "/v2/health/ready"))[0] == 200
    status, _, doc = await acall(address, "GET", "/v2")
    assert status == 200 and doc["name"] == "sluice-gateway"
    status, _, doc = await acall(address, "POST", "/v2/repository/index", b"{}")
    assert status == 200 and [(m["name"], m["version"]) for m in doc] == [("iris", "1"), ("iris", "2")]
    # x-model-version pins an unversioned path as it pins gRPC; a header disagreeing with the path
    # is refused by the service, naming both.
    for version in ("1", "2"):
        status, _, doc = await acall(address, "POST", "/v2/models/iris/infer", INFER_BODY, {"x-model-version": version})
        assert status == 200 and doc["model_version"] == version
    status, _, doc = await acall(address, "POST", "/v2/models/iris/versions/2/infer", INFER_BODY,
                                 {"x-model-version": "1"})
    assert status == 400 and "'2'" in doc["error"] and "'1'" in doc["error"], doc
    status, _, doc = await acall(address, "POST", "/v2/models/iris/infer", INFER_BODY, {"x-model-name": "mlp"})
    assert status == 400 and "disagrees with header x-model-name" in doc["error"], doc
    # Malformed JSON reaches the service and comes back as its 400, the gateway staying up.
    status, _, doc = await acall(address, "POST", "/v2/models/iris/infer", b"{not json")
    assert status == 400 and doc["error"]
    assert (await acall(address, "GET", "/v2/health/live"))[0] == 200


async def test_an_oversized_body_is_refused_as_json(rest_gateway: GatewayHandle) -> None:
    await wait_rest_routed(rest_gateway.address)
    oversized = b" " * (65 * 1024 * 1024)  # over the gateway's 64 MiB max_request_bytes
    status, content_type, body = await acall(rest_gateway.address, "POST", "/v2/models/iris/infer", oversized)
    assert status == 413 and content_type == "application/json", (status, content_type)
    assert "larger than" in body["error"]
    assert (await acall(rest_gateway.address, "POST", "/v2/models/iris/infer", INFER_BODY))[0] == 200


async def test_a_rate_limited_rest_call_is_429_as_json_and_others_still_pass(
        rest_gateway: GatewayHandle, shared_etcd: EtcdServer, gateway_prefix: str, tmp_path: Path) -> None:
    await wait_rest_routed(rest_gateway.address)
    # A second gateway over the same registry, iris limited to 2 requests a second.
    limited = start_gateway(shared_etcd, gateway_prefix, tmp_path / "limited", "--rate-limit", "iris=2")
    try:
        await wait_rest_routed(limited.address)
        answers = []
        for _ in range(50):  # each bucket holds 2 tokens: this drains the split route's in a few calls
            answers.append(await acall(limited.address, "POST", "/v2/models/iris/infer", INFER_BODY))
            if answers[-1][0] == 429:
                break
        status, content_type, body = answers[-1]
        assert status == 429 and content_type == "application/json", answers
        assert "the gateway's rate limit for this model" in body["error"], body
        assert [s for s, _, _ in answers[:-1]] == [200] * (len(answers) - 1), answers
        with pytest.raises(triton_http.InferenceServerException) as refused:
            client = triton_http.InferenceServerClient(limited.address, network_timeout=HTTP_TIMEOUT_S)
            try:
                inputs = triton_http.InferInput("input", [1, 4], "FP32")
                inputs.set_data_from_numpy(np.array(ROW, dtype=np.float32))
                for _ in range(50):
                    client.infer("iris", [inputs])
            finally:
                client.close()
        assert refused.value.status() == "429" and "rate limit" in (refused.value.message() or ""), refused.value
        # The limit is the gateway's: the other gateway, and the services behind both, still answer.
        assert (await acall(rest_gateway.address, "POST", "/v2/models/iris/infer", INFER_BODY))[0] == 200
    finally:
        limited.stop()
    assert (await acall(rest_gateway.address, "GET", "/v2/health/ready"))[0] == 200


async def test_unknown_paths_are_a_json_404_and_unknown_grpc_methods_a_grpc_status(
        rest_gateway: GatewayHandle) -> None:
    # One model behind the gateway: its gRPC routes take calls without a header, and they used to
    # take every other request too (503 after the retries against the gRPC port).
    address = rest_gateway.address
    await wait_rest_routed(address)
    for method, path, body in (("GET", "/v2/nothing", None), ("POST", "/foo", b"{}"), ("GET", "/", None),
                               ("GET", "/v2/models/unknown/infer", None), ("POST", "/v2/models/unknown/infer",
                                                                           INFER_BODY)):
        status, content_type, doc = await acall(address, method, path, body)
        assert status == 404 and content_type == "application/json", (method, path, status, doc)
        assert doc["error"], (method, path, doc)
    status, _, doc = await acall(address, "GET", "/v2/models/unknown/infer")
    assert "served models: iris" in doc["error"], doc
    # A REST client naming the model in the header gets the same 404, not a gRPC route.
    status, content_type, doc = await acall(address, "POST", "/foo", b"{}", {"x-model-name": "iris"})
    assert status == 404 and content_type == "application/json" and doc["error"], doc
    # gRPC calls to a method nobody serves still reach the model's service, which names the status.
    async with grpc.aio.insecure_channel(address) as channel:
        for name in ("/foo.Bar/Baz", "/inference.GRPCInferenceService/NoSuchMethod"):
            call = channel.unary_unary(name, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await call(b"", timeout=HTTP_TIMEOUT_S)
            assert excinfo.value.code() is grpc.StatusCode.UNIMPLEMENTED, (name, excinfo.value)
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await channel.unary_unary("/foo.Bar/Baz")(b"", metadata=(("x-model-name", "resnet"),),
                                                      timeout=HTTP_TIMEOUT_S)
        assert excinfo.value.code() is grpc.StatusCode.NOT_FOUND and "served models: iris" in \
            (excinfo.value.details() or "")
    assert (await acall(address, "POST", "/v2/models/iris/infer", INFER_BODY))[0] == 200


async def test_envoy_own_failures_reach_rest_clients_as_json(rest_gateway: GatewayHandle, shared_etcd: EtcdServer,
                                                             schema: KeySchema) -> None:
    # Last in the module: a second model whose only instance listens nowhere.
    dead = free_port()
    doc = InstanceRecord(address=f"127.0.0.1:{free_port()}", rest_address=f"127.0.0.1:{dead}", model="ghost",
                         version=1, instance_id="ghost-a", state=InstanceState.SERVING)
    shared_etcd.etcdctl("put", schema.instance("ghost", 1, "ghost-a"), doc.to_json().decode())

    async def routed() -> bool:
        status, _, index = await acall(rest_gateway.address, "POST", "/v2/repository/index", b"{}")
        return status == 200 and ("ghost", "1") in [(m["name"], m["version"]) for m in index]

    await eventually(routed, PROPAGATION_TIMEOUT_S, "ghost routed by the gateway")
    status, content_type, body = await acall(rest_gateway.address, "POST", "/v2/models/ghost/infer", INFER_BODY)
    assert status == 503 and content_type == "application/json", (status, content_type, body)
    assert body["error"]  # Envoy's own words ("upstream connect error ..."), as KServe's error body
    # The gateway's own JSON answers are not wrapped again.
    status, _, body = await acall(rest_gateway.address, "POST", "/v2/models/resnet/infer", INFER_BODY)
    assert status == 404 and "served models: ghost, iris" in body["error"]
