"""KServe v2 REST against a real service process: tritonclient.http unchanged, raw JSON, hostile bodies."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from mesh.ports import free_port
from services.catalog import ModelCatalog
from services.dataplane import DataPlane
from services.manager import ModelManager
from services.metrics import ServiceMetrics
from services.rest.app import RestApp
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import NUMPY_DTYPE, sample
from tests.services.conftest import start_handle

pytestmark = pytest.mark.timeout(120)
MAX_MB = 1


@pytest.fixture(scope="module")
def rest(zoo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceHandle, str]]:
    port = free_port()
    with start_handle(zoo_repo, tmp_path_factory.mktemp("rest-logs"), "--rest-port", str(port),
                      "--max-message-mb", str(MAX_MB)) as handle:
        yield handle, f"127.0.0.1:{port}"


def _post(address: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        connection.request("POST", path, body, headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def _onnx(zoo_repo: Path, model: str, feeds: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(str(zoo_repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


@pytest.mark.parametrize("datatype", models.NUMPY_DATATYPES)
@pytest.mark.parametrize(("binary", "compression"), [(True, None), (False, None), (True, "gzip"),
                                                     (False, "deflate")])
def test_tritonclient_http_gets_what_onnx_runtime_computes(rest: tuple[ServiceHandle, str], zoo_repo: Path,
                                                           datatype: str, binary: bool,
                                                           compression: str | None) -> None:
    data: Any
    if datatype == "FP16" and not binary:
        data = sample(datatype, (2, 3)).astype(np.float16)  # JSON numbers round-trip through FP16 exactly
    else:
        data = sample(datatype, (2, 3))
    if datatype == "BYTES" and not binary:
        data = np.array([b.decode() for b in data.reshape(-1)], dtype=np.object_).reshape(2, 3)
    model = f"identity_{datatype.lower()}"
    client = triton_http.InferenceServerClient(rest[1])
    tensor = triton_http.InferInput("x", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    result = client.infer(model, [tensor], model_version="1",
                          outputs=[triton_http.InferRequestedOutput("y", binary_data=binary)],
                          request_compression_algorithm=compression, response_compression_algorithm=compression)
    got = result.as_numpy("y")
    feed = data if datatype != "BYTES" else np.array([x.decode() if isinstance(x, bytes) else x
                                                      for x in data.reshape(-1)], dtype=object).reshape(2, 3)
    (expected,) = _onnx(zoo_repo, model, {"x": feed})
    assert got is not None and got.shape == expected.shape
    if datatype == "BYTES":
        assert [x.decode() if isinstance(x, bytes) else x for x in got.reshape(-1)] == list(expected.reshape(-1))
    else:
        assert got.dtype == np.dtype(NUMPY_DTYPE[datatype])
        np.testing.assert_array_equal(got, expected)
    assert result.get_response()["model_version"] == "1"


def test_health_metadata_and_readiness(rest: tuple[ServiceHandle, str]) -> None:
    client = triton_http.InferenceServerClient(rest[1])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    assert not client.is_model_ready("no_such_model")
    assert client.get_server_metadata()["name"] == "sluice"
    meta = client.get_model_metadata("iris")
    assert meta["name"] == "iris" and meta["inputs"][0]["name"] == "input"
    assert client.get_model_config("iris")["name"] == "iris"
    assert client.get_inference_statistics("iris")["model_stats"]
    assert any(row["name"] == "iris" for row in client.get_model_repository_index())


def test_curl_style_json_nested_and_flat(rest: tuple[ServiceHandle, str], zoo_repo: Path) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    (label, _probabilities) = _onnx(zoo_repo, "iris", {"input": np.array(rows, dtype=np.float32)})
    for data in (rows, [v for row in rows for v in row]):
        status, doc = _post(rest[1], "/v2/models/iris/versions/1/infer", json.dumps(
            {"id": "r1", "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": data}]}).encode())
        assert status == 200, doc
        assert doc["id"] == "r1" and doc["model_version"] == "1"
        outputs = {o["name"]: o for o in doc["outputs"]}
        assert outputs["label"]["data"] == label.tolist()


def _infer_body(**tensor: Any) -> bytes:
    base = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    base.update(tensor)
    base = {key: value for key, value in base.items() if value is not None}  # data=None: no data at all
    return json.dumps({"inputs": [base]}).encode()


@pytest.mark.parametrize(("path", "body", "headers", "status", "text"), [
    ("/v2/models/iris/infer", b"{not json", {}, 400, "not valid JSON"),
    ("/v2/models/iris/infer", _infer_body(shape=[1, 3], data=[1, 2, 3]), {}, 400, "expected shape [-1, 4], got [1, 3]"),
    ("/v2/models/iris/infer", _infer_body(datatype="INT32"), {}, 400, "input"),
    ("/v2/models/iris/infer", _infer_body(data=[1, 2, "x", 4]), {}, 400, "element 2 is a string"),
    ("/v2/models/iris/infer", _infer_body(data=[1, 2, 3]), {}, 400, "data has 3 elements, expected 4"),
    ("/v2/models/iris/infer", _infer_body(data=None, parameters={"binary_data_size": 16}) + b"\0" * 8,
     {"Inference-Header-Content-Length": str(len(_infer_body(data=None, parameters={"binary_data_size": 16})))},
     400, "runs past the end of the body"),
    ("/v2/models/iris/infer", _infer_body(), {"Inference-Header-Content-Length": "100000"}, 400,
     "but the body is only"),
    ("/v2/models/iris/infer", b"x" * (MAX_MB * 1024 * 1024 + 1), {}, 413, "max message size"),
    ("/v2/models/iris/infer", gzip.compress(b" " * (MAX_MB * 1024 * 1024 * 8)), {"Content-Encoding": "gzip"}, 413,
     "decompresses to more than"),
    ("/v2/models/iris/infer", zlib.compress(_infer_body())[:-6], {"Content-Encoding": "deflate"}, 400, "truncated"),
    ("/v2/models/no_such_model/infer", _infer_body(), {}, 404, "no_such_model"),
    ("/v2/models/iris/versions/9/infer", _infer_body(), {}, 404, "9"),
    ("/v2/models/iris/versions/01/infer", _infer_body(), {}, 400, "not a positive integer"),
    ("/v2/models/iris/versions/1/infer", _infer_body(), {"x-model-version": "2"}, 400, "disagrees with header"),
    ("/v2/nothing/here", b"", {}, 404, "no KServe v2 endpoint"),
    ("/v2/repository/models/iris/unload", b"", {}, 403, "disabled"),
])
def test_hostile_requests_get_status_and_message(  # noqa: PLR0917 (one parameter per column of the table)
        rest: tuple[ServiceHandle, str], path: str, body: bytes, headers: dict[str, str], status: int,
        text: str) -> None:
    got, doc = _post(rest[1], path, body, headers)
    assert got == status, doc
    assert text in doc["error"]
    assert rest[0].process.alive()
    ok, _ = _post(rest[1], "/v2/models/iris/infer", _infer_body())
    assert ok == 200


def test_version_header_chooses_when_path_names_none(rest: tuple[ServiceHandle, str]) -> None:
    status, doc = _post(rest[1], "/v2/models/iris/infer", _infer_body(), {"x-model-version": "1"})
    assert status == 200 and doc["model_version"] == "1"


def test_tritonclient_error_message(rest: tuple[ServiceHandle, str]) -> None:
    client = triton_http.InferenceServerClient(rest[1])
    tensor = triton_http.InferInput("input", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"expected shape \[-1, 4\], got \[1, 3\]"):
        client.infer("iris", [tensor])


def test_over_the_in_flight_bound_is_429_before_the_body_is_read(zoo_repo: Path, tmp_path: Path) -> None:
    """With --max-concurrency 1 the bound is 4 inferences in flight. Four requests whose bodies are
    still on the way hold the four slots; a fifth that declares a body and sends none is refused at
    once instead of waiting for its body."""
    port = free_port()
    handle = start_handle(zoo_repo, tmp_path, "--rest-port", str(port), "--max-concurrency", "1")
    holders: list[socket.socket] = []
    try:
        head = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            holders.append(sock)
            sock.sendall(head + b'{"inputs": [')  # the rest never comes while the test runs
        # The holders' headers may reach the service after the first late request: then that one
        # holds a slot itself (its body never comes) and the next is refused. Before the fix no
        # request held a slot while its body was on the way, and every late one timed out.
        answers = []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
                late.sendall(head)
                try:
                    answers.append(_read_answer(late))
                except TimeoutError:
                    answers.append(b"(no answer within 5 s)")
                    continue
            break
        assert answers[-1].startswith(b"HTTP/1.1 429 "), answers
        assert b"in flight" in answers[-1]
    finally:
        for sock in holders:
            sock.close()
        handle.process.stop()


def _read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer (head and Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


async def test_load_past_its_timeout_is_504_and_goes_on(tmp_path: Path) -> None:
    """The app in this process over a real manager and catalog: a load that outlasts the wait is a
    504 that says so, and the load is not cancelled halfway: the model becomes ready afterwards."""
    repo = tmp_path / "repo"
    models.write_model(repo, "late", models.identity("FP32", ["batch", 1]))
    catalog = ModelCatalog()
    manager = ModelManager(repo, catalog, ServiceMetrics(), repository_control=True)
    plane = DataPlane(catalog, manager)
    with ThreadPoolExecutor(2) as executor:
        app = RestApp(plane, manager, executor, max_bytes=1 << 20, max_in_flight=4)
        app.control_timeout = 0.0  # any load outlasts it: its first step runs on a thread
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        try:
            scope = {"type": "http", "method": "POST", "path": "/v2/repository/models/late/load", "headers": []}
            await app(scope, receive, send)
            assert sent[0]["status"] == 504
            message = json.loads(sent[1]["body"])["error"]
            assert "did not finish within 0 s" in message and "goes on" in message, message
            assert len(app.control_tasks) == 1
            await asyncio.wait_for(asyncio.gather(*app.control_tasks), 60)
            assert plane.model_ready("late", None)
        finally:
            await manager.close()
