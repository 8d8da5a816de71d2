"""KServe datatypes end to end: every type through Identity and Cast models on the real service,
plus the BYTES framing and type mapping as units."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services import datatypes
from services.errors import InvalidRequestError, UnsupportedError
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import (
    CONTENTS_FIELD,
    RPC_TIMEOUT_S,
    assert_no_traceback,
    check_still_serving,
    decode_outputs,
    expect_error,
    infer_input,
    raw_request,
    sample,
    stub_for,
    typed_request,
)
from tests.services.conftest import CASTS

SHAPE = (3, 4)

# -- through the service ------------------------------------------------------------------------

@pytest.mark.parametrize("datatype", models.NUMPY_DATATYPES)
def test_identity_round_trip_raw_with_tritonclient(client: triton_grpc.InferenceServerClient,
                                                    datatype: str) -> None:
    data = sample(datatype, SHAPE, seed=len(datatype))
    result = client.infer(f"identity_{datatype.lower()}", [infer_input("x", data, datatype)],
                          client_timeout=RPC_TIMEOUT_S)
    output = result.get_output("y")
    assert output.datatype == datatype
    assert list(output.shape) == list(SHAPE)
    np.testing.assert_array_equal(result.as_numpy("y"), data)


@pytest.mark.parametrize("datatype", tuple(CONTENTS_FIELD))
def test_identity_round_trip_typed_contents(zoo: ServiceHandle, datatype: str) -> None:
    data = sample(datatype, SHAPE, seed=7)
    with stub_for(zoo) as stub:
        response = stub.ModelInfer(typed_request(f"identity_{datatype.lower()}", "x", datatype, data),
                                   timeout=RPC_TIMEOUT_S)
    assert response.outputs[0].datatype == datatype
    np.testing.assert_array_equal(decode_outputs(response)["y"], data)


def test_bytes_that_are_not_utf8_round_trip_or_are_refused(client: triton_grpc.InferenceServerClient) -> None:
    # ONNX Runtime's string tensors hold text: exact bytes back, or a clear refusal, never altered data.
    data = np.array([[b"\xff\xfe\x00", b"\x00"], [b"plain", b""]], dtype=np.object_)
    try:
        result = client.infer("identity_bytes", [infer_input("x", data, "BYTES")],
                              client_timeout=RPC_TIMEOUT_S)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc.message()
        assert "'x'" in exc.message() and "UTF-8" in exc.message()
        return
    np.testing.assert_array_equal(result.as_numpy("y"), data)


def test_fp16_has_no_typed_contents_field(zoo: ServiceHandle) -> None:
    tensor_request = raw_request("identity_fp16", {"x": ("FP16", np.zeros((1, 2), np.float16))})
    del tensor_request.raw_input_contents[:]
    with stub_for(zoo) as stub:
        expect_error(lambda: stub.ModelInfer(tensor_request, timeout=RPC_TIMEOUT_S),
                     grpc.StatusCode.INVALID_ARGUMENT, "'x'", "FP16", "raw_input_contents")
    check_still_serving(zoo)


@pytest.mark.parametrize(("source", "target"), CASTS)
def test_cast_matches_onnx_runtime(client: triton_grpc.InferenceServerClient, source: str, target: str) -> None:
    data = sample(source, SHAPE, seed=3)
    if source.startswith("FP"):
        # In-range values with fractions and signs: out-of-range float->int casts are undefined behaviour.
        data = (np.random.default_rng(3).standard_normal(SHAPE) * 100).astype(data.dtype)
    name = f"cast_{source.lower()}_{target.lower()}"
    session = ort.InferenceSession(models.cast(source, target).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": data})
    result = client.infer(name, [infer_input("x", data, source)], client_timeout=RPC_TIMEOUT_S)
    assert result.get_output("y").datatype == target
    np.testing.assert_array_equal(result.as_numpy("y"), expected)


def test_bf16_request_is_refused_naming_bf16(zoo: ServiceHandle) -> None:
    # BF16 raw data for an FP32 model: 2 bytes per element.
    request = raw_request("identity_fp32", {"x": ("FP32", np.zeros((1, 2), np.float32))})
    request.inputs[0].datatype = "BF16"
    request.raw_input_contents[0] = b"\x80\x3f" * 2
    with stub_for(zoo) as stub:
        expect_error(lambda: stub.ModelInfer(request, timeout=RPC_TIMEOUT_S),
                     grpc.StatusCode.UNIMPLEMENTED, "BF16")
        typed = pb_without_raw(request)
        expect_error(lambda: stub.ModelInfer(typed, timeout=RPC_TIMEOUT_S),
                     grpc.StatusCode.UNIMPLEMENTED, "BF16")
    check_still_serving(zoo)


def test_bf16_with_tritonclient(client: triton_grpc.InferenceServerClient) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tensor = infer_input("x", np.ones((1, 2), dtype=ml_dtypes.bfloat16), "BF16")
    with pytest.raises(InferenceServerException) as caught:
        client.infer("identity_fp32", [tensor], client_timeout=RPC_TIMEOUT_S)
    assert caught.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "BF16" in caught.value.message()
    assert_no_traceback(caught.value.message())


def pb_without_raw(request: object) -> object:
    copy = type(request)()  # type: ignore[operator]
    copy.CopyFrom(request)
    del copy.raw_input_contents[:]
    return copy


# -- units --------------------------------------------------------------------------------------

def _frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def test_bytes_framing_round_trip() -> None:
    items = [b"", b"a", "✓".encode(), b"\x00" * 5]
    decoded = datatypes.decode_bytes(_frame(*items), len(items), "x")
    # ONNX Runtime string tensors take str: bytes objects would be stored as "b'...'".
    assert list(decoded) == [item.decode() for item in items]
    assert datatypes.encode_bytes(decoded) == _frame(*items)


def test_bytes_that_are_not_utf8_are_refused_by_index() -> None:
    with pytest.raises(InvalidRequestError, match="input 'x': BYTES element 1 is not valid UTF-8"):
        datatypes.decode_bytes(_frame(b"ok", b"\xff"), 2, "x")


@pytest.mark.parametrize(("raw", "count", "fragment"), [
    # Data of at least 4 bytes per element, so that the framing itself is what fails.
    pytest.param(_frame(b"ab") + b"\x01\x00", 2, "no 4-byte length prefix at offset 6", id="truncated-prefix"),
    pytest.param(_frame(b"ab")[:-1], 1, "declares 2 bytes but only 1 remain", id="past-the-end"),
    pytest.param(_frame(b"ab") + b"!", 1, "1 bytes left over after 1 BYTES elements", id="leftover"),
    pytest.param(_frame(b"abcd"), 2, "ends after 1 of 2 elements", id="too-few"),
    pytest.param(b"\x01\x00", 1, "1 BYTES elements need at least 4 bytes", id="shorter-than-prefixes"),
])
def test_bytes_framing_errors_name_the_problem(raw: bytes, count: int, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match="input 'x'") as caught:
        datatypes.decode_bytes(raw, count, "x")
    assert fragment in str(caught.value)


def test_bytes_declaring_more_elements_than_the_data_holds_are_refused_before_allocating() -> None:
    """300,000,000 declared elements in 0 bytes once made the server allocate 2.4 GB first (and
    then fail on the missing first prefix): the element count is checked against the bytes first."""
    with pytest.raises(InvalidRequestError, match=r"300000000 BYTES elements need at least 1200000000 bytes"):
        datatypes.decode_bytes(b"", 300_000_000, "x")


LIMIT = 64 * 1024 * 1024


@pytest.mark.parametrize(("shape", "count"), [
    pytest.param((), 1, id="scalar"), pytest.param((3, 4), 12, id="matrix"), pytest.param((0, 5), 0, id="empty"),
    pytest.param((0, LIMIT), 0, id="empty-at-the-limit"), pytest.param((1,) * 64, 1, id="64-dims"),
    pytest.param((LIMIT,), LIMIT, id="at-the-limit"),
])
def test_check_shape_counts_elements(shape: tuple[int, ...], count: int) -> None:
    assert datatypes.check_shape("x", shape, LIMIT) == count


@pytest.mark.parametrize(("shape", "fragment"), [
    pytest.param((0, 2 ** 62), "declares more than", id="zero-then-absurd"),
    pytest.param((0, 2 ** 62, 2 ** 62), "declares more than", id="product-overflows-int64"),
    pytest.param((2 ** 62, 4), "declares more than", id="absurd-first"),
    pytest.param((1, 2 ** 40), "declares more than", id="bytes-2-40"),
    pytest.param((LIMIT + 1,), "declares more than 67108864 elements", id="one-over"),
    pytest.param((2 ** 16, 2 ** 16), "declares more than", id="product-over"),
    pytest.param((1,) * 65, "shape has 65 dimensions; at most 64", id="65-dims"),
    pytest.param((2, -1), "negative dimension", id="negative"),
])
def test_check_shape_refuses_what_no_request_can_carry(shape: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match="input 'x'") as caught:
        datatypes.check_shape("x", shape, LIMIT)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("datatype", models.NUMPY_DATATYPES)
def test_every_onnx_type_maps_back_to_its_kserve_name(datatype: str) -> None:
    session = ort.InferenceSession(models.identity(datatype).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert datatypes.from_onnx(session.get_inputs()[0].type) == datatype
    assert datatype in datatypes.TRITON_TYPE


def test_bf16_and_unknown_names() -> None:
    with pytest.raises(UnsupportedError, match="BF16"):
        datatypes.to_numpy("BF16")
    with pytest.raises(InvalidRequestError, match="unknown datatype 'FP8'"):
        datatypes.to_numpy("FP8")
    with pytest.raises(UnsupportedError, match="tensor\\(complex64\\)"):
        datatypes.from_onnx("tensor(complex64)")


def test_to_raw_is_little_endian() -> None:
    big = np.array([1, 256], dtype=">u2")
    assert datatypes.to_raw(big) == b"\x01\x00\x00\x01"
    assert datatypes.from_numpy(big) == "UINT16"
