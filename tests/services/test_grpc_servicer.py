"""The GRPCInferenceService as a client sees it: errors, metadata RPCs, ids, outputs, streaming."""

from __future__ import annotations

import queue
import struct
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.service import ServiceHandle
from tests.services.clients import (
    RPC_TIMEOUT_S,
    assert_no_traceback,
    check_still_serving,
    decode_outputs,
    expect_error,
    infer_input,
    raw_request,
    stub_for,
)
from tests.services.conftest import BATCH_WINDOW_US

INVALID = grpc.StatusCode.INVALID_ARGUMENT
A = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.full((2, 3), 0.5, dtype=np.float32)


@pytest.fixture
def stub(zoo: ServiceHandle) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with stub_for(zoo) as plain:
        yield plain


def _arith(**changes: Any) -> pb.ModelInferRequest:
    request = raw_request("arithmetic", {"a": ("FP32", A), "b": ("FP32", B)})
    for key, value in changes.items():
        setattr(request, key, value)
    return request


def _mutated(mutate: Callable[[pb.ModelInferRequest], None], model: str = "arithmetic") -> pb.ModelInferRequest:
    request = (_arith() if model == "arithmetic"
               else raw_request(model, {"x": ("BYTES", np.array([[b"ab", b"c"]], dtype=np.object_))}))
    mutate(request)
    return request


def _set(path: str, value: Any) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(request: pb.ModelInferRequest) -> None:
        target: Any = request
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        if last.isdigit():
            target[int(last)] = value
        elif isinstance(value, list):
            del getattr(target, last)[:]
            getattr(target, last).extend(value)
        else:
            setattr(target, last, value)
    return mutate


def _drop_input(index: int) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(request: pb.ModelInferRequest) -> None:
        del request.inputs[index]
        del request.raw_input_contents[index]
    return mutate


def _duplicate_input(request: pb.ModelInferRequest) -> None:
    request.inputs[1].name = "a"


def _typed_wrong_count(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([1.0] * 5)
    request.inputs[1].contents.fp32_contents.extend([1.0] * 6)


def _request_output(name: str) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(request: pb.ModelInferRequest) -> None:
        request.outputs.add(name=name)
    return mutate


def _rows(count: int) -> Callable[[pb.ModelInferRequest], None]:
    def mutate(request: pb.ModelInferRequest) -> None:
        data = np.zeros((count, 3), dtype=np.float32)
        for index in range(2):
            request.inputs[index].shape[:] = [count, 3]
            request.raw_input_contents[index] = data.tobytes()
    return mutate


def _one_row_b(request: pb.ModelInferRequest) -> None:
    request.inputs[1].shape[:] = [1, 3]
    request.raw_input_contents[1] = B[:1].tobytes()


_FRAMED = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"

MALFORMED = [
    pytest.param(_set("model_name", "nope"), grpc.StatusCode.NOT_FOUND, ["unknown model 'nope'"],
                 id="unknown-model"),
    pytest.param(_set("model_name", ""), INVALID, ["model_name is empty"], id="empty-model-name"),
    pytest.param(_set("model_version", "7"), grpc.StatusCode.NOT_FOUND, ["no version 7", "serving versions: 1"],
                 id="unknown-version"),
    pytest.param(_set("model_version", "abc"), INVALID, ["model_version 'abc'", "positive integer"],
                 id="non-numeric-version"),
    pytest.param(_set("model_version", "0"), INVALID, ["model_version '0'"], id="version-zero"),
    # str.isdigit() is true for '²', which int() refuses: must not become INTERNAL.
    pytest.param(_set("model_version", "²"), INVALID, ["model_version '²'"], id="superscript-version"),
    pytest.param(_set("inputs.1.name", "c"), INVALID, ["unknown input 'c'", "expected inputs: a, b"],
                 id="unknown-input"),
    pytest.param(_drop_input(1), INVALID, ["missing input(s) 'b'"], id="missing-input"),
    pytest.param(_duplicate_input, INVALID, ["input 'a' appears more than once"], id="duplicate-input"),
    pytest.param(_set("inputs.0.datatype", "INT32"), INVALID, ["input 'a'", "expected datatype FP32, got INT32"],
                 id="wrong-datatype"),
    pytest.param(_set("inputs.0.datatype", "FP8"), INVALID, ["unknown datatype 'FP8'"], id="unknown-datatype"),
    pytest.param(_set("inputs.0.shape", [3, 2]), INVALID, ["input 'a'", "expected shape [-1, 3], got [3, 2]"],
                 id="wrong-shape"),
    pytest.param(_set("inputs.0.shape", [2, 3, 1]), INVALID, ["expected shape [-1, 3], got [2, 3, 1]"],
                 id="wrong-rank"),
    pytest.param(_set("inputs.0.shape", [-2, 3]), INVALID, ["input 'a'", "negative dimension"],
                 id="negative-dim"),
    pytest.param(_set("raw_input_contents.0", b"\x00" * 20), INVALID,
                 ["input 'a'", "raw data is 20 bytes, expected 24"], id="raw-length"),
    pytest.param(_set("raw_input_contents", [A.tobytes()]), INVALID,
                 ["raw_input_contents has 1 entries for 2 inputs"], id="raw-count"),
    pytest.param(_typed_wrong_count, INVALID, ["input 'a'", "fp32_contents has 5 elements, expected 6"],
                 id="typed-count"),
    pytest.param(_request_output("nope"), INVALID, ["unknown output 'nope'", "sum, difference, product"],
                 id="unknown-output"),
    pytest.param(_rows(33), INVALID, ["batch of 33 rows exceeds max_batch_size 32"], id="batch-too-large"),
    pytest.param(_one_row_b, INVALID, ["first (batch) dimension is 1", "other inputs have 2"],
                 id="batch-mismatch"),
]

BYTES_MALFORMED = [
    pytest.param(_FRAMED[:-1] + b"", ["declares 1 bytes but only 0 remain"], id="length-past-end"),
    pytest.param(_FRAMED[:6] + b"\x01\x00", ["ends after 1 of 2 elements", "no 4-byte length prefix"],
                 id="truncated-prefix"),
    pytest.param(_FRAMED + b"\x00", ["1 bytes left over after 2 BYTES elements"], id="leftover"),
]


@pytest.mark.parametrize(("mutate", "code", "fragments"), MALFORMED)
def test_malformed_request_names_the_problem(zoo: ServiceHandle, stub: pb_grpc.GRPCInferenceServiceStub,
                                             mutate: Callable[[pb.ModelInferRequest], None],
                                             code: grpc.StatusCode, fragments: list[str]) -> None:
    request = _mutated(mutate)
    expect_error(lambda: stub.ModelInfer(request, timeout=RPC_TIMEOUT_S), code, *fragments)
    check_still_serving(zoo)


@pytest.mark.parametrize(("raw", "fragments"), BYTES_MALFORMED)
def test_bad_bytes_framing_names_the_problem(zoo: ServiceHandle, stub: pb_grpc.GRPCInferenceServiceStub,
                                             raw: bytes, fragments: list[str]) -> None:
    request = _mutated(_set("raw_input_contents.0", raw), model="identity_bytes")
    expect_error(lambda: stub.ModelInfer(request, timeout=RPC_TIMEOUT_S), INVALID, "input 'x'", *fragments)
    check_still_serving(zoo)


@pytest.mark.parametrize(("rpc", "request_message", "fragment"), [
    ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(), "system shared memory is not supported"),
    ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=8),
     "system shared memory is not supported"),
    ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest(), "CUDA shared memory is not supported"),
    ("TraceSetting", pb.TraceSettingRequest(), "TraceSetting is not supported"),
    ("LogSettings", pb.LogSettingsRequest(), "LogSettings is not supported"),
])
def test_unimplemented_rpcs_say_so(zoo: ServiceHandle, stub: pb_grpc.GRPCInferenceServiceStub, rpc: str,
                                   request_message: Any, fragment: str) -> None:
    call = getattr(stub, rpc)
    expect_error(lambda: call(request_message, timeout=RPC_TIMEOUT_S), grpc.StatusCode.UNIMPLEMENTED, fragment)
    check_still_serving(zoo)


def test_tritonclient_shared_memory_error(client: triton_grpc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_system_shared_memory_status()
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "shared memory" in caught.value.message()
    assert_no_traceback(caught.value.message())


# -- metadata -----------------------------------------------------------------------------------

def test_server_metadata_and_liveness(client: triton_grpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "sluice"
    assert "model_repository" in metadata.extensions


def test_model_metadata_uses_minus_one_and_kserve_names(client: triton_grpc.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("iris")
    assert metadata.name == "iris"
    assert list(metadata.versions) == ["1", "2"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 3])]
    fp16 = client.get_model_metadata("identity_fp16")
    assert (fp16.inputs[0].datatype, list(fp16.inputs[0].shape)) == ("FP16", [-1, -1])
    assert client.get_model_metadata("identity_bytes").outputs[0].datatype == "BYTES"
    assert list(client.get_model_metadata("fixed").inputs[0].shape) == [2, 3]


def test_model_metadata_of_unknown_model(client: triton_grpc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("iris", model_version="x")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


LONG_NAME = "m" * (1024 * 1024)


@pytest.mark.parametrize(("rpc", "request_message", "fragments"), [
    # A 1 MiB name echoed whole made the status too large for the client to read
    # (RESOURCE_EXHAUSTED "received metadata size exceeds hard limit").
    ("ModelMetadata", pb.ModelMetadataRequest(name=LONG_NAME), ["name 'mmm", "more characters]",
                                                                          "is not a model name"]),
    ("ModelConfig", pb.ModelConfigRequest(name=LONG_NAME), ["is not a model name"]),
    ("ModelStatistics", pb.ModelStatisticsRequest(name=LONG_NAME), ["is not a model name"]),
    ("ModelMetadata", pb.ModelMetadataRequest(name="../iris"), ["name '../iris' is not a model name"]),
    # Versions in canonical form only, as the gateway and etcd keys have them: "01" is not version 1.
    ("ModelMetadata", pb.ModelMetadataRequest(name="iris", version="01"),
     ["model_version '01' is not a positive integer without sign or leading zeros"]),
    ("ModelConfig", pb.ModelConfigRequest(name="iris", version="+1"), ["model_version '+1'"]),
    ("ModelMetadata", pb.ModelMetadataRequest(name="iris", version="9" * 100_000),
     ["more characters]"]),
])
def test_metadata_rpcs_refuse_names_and_versions_outside_the_rules(
        stub: pb_grpc.GRPCInferenceServiceStub, rpc: str, request_message: Any, fragments: list[str]) -> None:
    call = getattr(stub, rpc)
    details = expect_error(lambda: call(request_message, timeout=RPC_TIMEOUT_S), INVALID, *fragments)
    assert len(details) < 1024, details[:300]


def test_model_ready_with_a_non_canonical_version_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name="iris", version="1"), timeout=RPC_TIMEOUT_S).ready
    expect_error(lambda: stub.ModelReady(pb.ModelReadyRequest(name="iris", version="01"), timeout=RPC_TIMEOUT_S),
                 INVALID, "model_version '01'")


def test_model_config_leaves_out_the_batch_dim(client: triton_grpc.InferenceServerClient) -> None:
    config = client.get_model_config("iris").config
    assert config.max_batch_size == 32
    assert config.platform == "onnxruntime_onnx"
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [4])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("label", []), ("probabilities", [3])]
    assert config.input[0].data_type == triton_grpc.model_config_pb2.TYPE_FP32
    assert config.output[0].data_type == triton_grpc.model_config_pb2.TYPE_INT64
    labelled = client.get_model_config("arithmetic").config
    assert labelled.parameters["team"].string_value == "tests"
    windowed = client.get_model_config("windowed").config
    assert windowed.max_batch_size == 8
    assert windowed.dynamic_batching.max_queue_delay_microseconds == BATCH_WINDOW_US
    assert client.get_model_config("identity_bytes").config.input[0].data_type == \
        triton_grpc.model_config_pb2.TYPE_STRING


def test_model_config_without_batching_keeps_every_dim(client: triton_grpc.InferenceServerClient) -> None:
    fixed = client.get_model_config("fixed").config
    assert fixed.max_batch_size == 0
    assert list(fixed.input[0].dims) == [2, 3]
    column_sum = client.get_model_config("column_sum").config
    assert column_sum.max_batch_size == 0
    assert list(column_sum.input[0].dims) == [-1, 3]
    assert list(column_sum.output[0].dims) == [1, 3]


def test_model_statistics_count_requests(client: triton_grpc.InferenceServerClient) -> None:
    x = np.ones((3, 2), dtype=np.float32)
    for _ in range(4):
        client.infer("counted", [infer_input("x", x, "FP32")], client_timeout=RPC_TIMEOUT_S)
    with pytest.raises(InferenceServerException):  # fails validation: counted as a failure
        client.infer("counted", [infer_input("x", np.ones(2, dtype=np.float32), "FP32")],
                     client_timeout=RPC_TIMEOUT_S)
    (stats,) = client.get_inference_statistics("counted").model_stats
    assert (stats.name, stats.version) == ("counted", "1")
    assert stats.inference_count == 12  # rows
    assert stats.inference_stats.success.count == 4
    assert stats.inference_stats.fail.count == 1
    assert 1 <= stats.execution_count <= 4
    assert stats.inference_stats.success.ns > 0
    assert stats.last_inference > 0
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    everything = client.get_inference_statistics().model_stats
    assert {"counted", "iris", "mlp"} <= {s.name for s in everything}
    with pytest.raises(InferenceServerException) as caught:
        client.get_inference_statistics("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_shows_ready_and_broken_models(client: triton_grpc.InferenceServerClient,
                                                        stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert index[("iris", "1")].state == index[("iris", "2")].state == "READY"
    broken = index[("broken", "1")]
    assert broken.state == "UNAVAILABLE"
    assert "model.onnx" in broken.reason and "cannot load" in broken.reason
    ready_index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=RPC_TIMEOUT_S)
    ready_only = {(m.name, m.version) for m in ready_index.models}
    assert ("iris", "2") in ready_only and ("broken", "1") not in ready_only
    assert client.is_server_ready()
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("nope")


def test_broken_model_inference_is_unavailable_with_reason(zoo: ServiceHandle,
                                                            stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = raw_request("broken", {"x": ("FP32", A)})
    expect_error(lambda: stub.ModelInfer(request, timeout=RPC_TIMEOUT_S), grpc.StatusCode.UNAVAILABLE,
                 "model 'broken' has no version ready", "UNAVAILABLE", "cannot load")
    check_still_serving(zoo)


# -- requests and responses ---------------------------------------------------------------------

def test_request_id_is_echoed(client: triton_grpc.InferenceServerClient) -> None:
    result = client.infer("arithmetic", [infer_input("a", A, "FP32"), infer_input("b", B, "FP32")],
                          request_id="req-42", client_timeout=RPC_TIMEOUT_S)
    response = result.get_response()
    assert response.id == "req-42"
    assert (response.model_name, response.model_version) == ("arithmetic", "1")


def test_requested_outputs_only(client: triton_grpc.InferenceServerClient) -> None:
    inputs = [infer_input("a", A, "FP32"), infer_input("b", B, "FP32")]
    result = client.infer("arithmetic", inputs, outputs=[triton_grpc.InferRequestedOutput("product")],
                          client_timeout=RPC_TIMEOUT_S)
    assert [o.name for o in result.get_response().outputs] == ["product"]
    np.testing.assert_array_equal(result.as_numpy("product"), A * B)
    both = client.infer("arithmetic", inputs, client_timeout=RPC_TIMEOUT_S,
                        outputs=[triton_grpc.InferRequestedOutput("difference"),
                                 triton_grpc.InferRequestedOutput("sum")])
    assert [o.name for o in both.get_response().outputs] == ["difference", "sum"]
    np.testing.assert_array_equal(both.as_numpy("difference"), A - B)
    np.testing.assert_array_equal(both.as_numpy("sum"), A + B)
    everything = client.infer("arithmetic", inputs, client_timeout=RPC_TIMEOUT_S)
    assert [o.name for o in everything.get_response().outputs] == ["sum", "difference", "product"]


def test_request_parameters_are_accepted(client: triton_grpc.InferenceServerClient,
                                         stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    result = client.infer("arithmetic", [infer_input("a", A, "FP32"), infer_input("b", B, "FP32")],
                          parameters={"tag": "x", "count": 3, "flag": True, "ratio": 0.5},
                          client_timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(result.as_numpy("sum"), A + B)
    request = _arith()
    request.parameters["priority"].int64_param = 1
    request.parameters["binary_data_output"].bool_param = True
    request.inputs[0].parameters["note"].string_param = "per-input"
    np.testing.assert_array_equal(decode_outputs(stub.ModelInfer(request, timeout=RPC_TIMEOUT_S))["sum"], A + B)


def test_version_can_be_chosen(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    for version in ("1", "2"):
        response = stub.ModelInfer(raw_request("iris", {"input": ("FP32", x)}, version=version),
                                   timeout=RPC_TIMEOUT_S)
        assert response.model_version == version
    latest = stub.ModelInfer(raw_request("iris", {"input": ("FP32", x)}), timeout=RPC_TIMEOUT_S)
    assert latest.model_version == "2"


# -- streaming ----------------------------------------------------------------------------------

def test_stream_infer_answers_good_and_bad_requests(zoo: ServiceHandle) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with triton_grpc.InferenceServerClient(zoo.address) as streaming:
        streaming.start_stream(callback=lambda result, error: results.put((result, error)),
                               stream_timeout=60)
        try:
            good = [infer_input("a", A, "FP32"), infer_input("b", B, "FP32")]
            streaming.async_stream_infer("arithmetic", good, request_id="good-1")
            streaming.async_stream_infer("arithmetic", [infer_input("a", A, "FP32")], request_id="bad-1")
            streaming.async_stream_infer("nope", good, request_id="bad-2")
            first = [results.get(timeout=RPC_TIMEOUT_S) for _ in range(3)]
            # The stream is still open after the errors.
            streaming.async_stream_infer("arithmetic", good, request_id="good-2")
            later = results.get(timeout=RPC_TIMEOUT_S)
        finally:
            streaming.stop_stream()
    successes = {r.get_response().id: r for r, e in [*first, later] if e is None}
    errors = [e for r, e in [*first, later] if e is not None]
    assert set(successes) == {"good-1", "good-2"}
    for result in successes.values():
        np.testing.assert_array_equal(result.as_numpy("sum"), A + B)
    messages = sorted(e.message() for e in errors)
    assert len(messages) == 2, messages
    assert any("missing input(s) 'b'" in m for m in messages), messages
    assert any("unknown model 'nope'" in m for m in messages), messages
    for message in messages:
        assert_no_traceback(message)
    check_still_serving(zoo)


def test_stream_with_plain_stub_keeps_ids(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    requests = [_arith(id="s1"), _arith(id="s2", model_version="9"), _arith(id="s3")]
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=RPC_TIMEOUT_S))
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"s1", "s2", "s3"}
    assert by_id["s1"].error_message == by_id["s3"].error_message == ""
    assert "no version 9" in by_id["s2"].error_message
    np.testing.assert_array_equal(decode_outputs(by_id["s3"].infer_response)["difference"], A - B)
