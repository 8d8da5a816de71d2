"""Client-side helpers: build requests with plain stubs or tritonclient, decode answers, check errors.

Decoding here is written independently of ``services.datatypes`` (tritonclient's BYTES
deserializer, ``numpy.frombuffer``), so a symmetric bug on the server cannot hide itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as triton_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.service import ServiceHandle

RPC_TIMEOUT_S: Final = 15.0

NUMPY_DTYPE: Final[dict[str, Any]] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
    "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}

# Which InferTensorContents field carries each datatype (there is none for FP16 and BF16).
CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

TRACEBACK_MARKERS: Final = ("Traceback", 'File "', "line ", ".py")


def sample(datatype: str, shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[Any]:
    """Random data covering each type's range (extremes included where the shape allows)."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if datatype == "BYTES":
        words = [b"", b"a", b"hello world", "héllo ✓".encode(), b"x" * 300, b"0123"]
        return np.array([words[i % len(words)] for i in range(count)], dtype=np.object_).reshape(shape)
    dtype = np.dtype(NUMPY_DTYPE[datatype])
    if dtype.kind == "f":
        values = rng.standard_normal(count).astype(dtype) * 1000
        extremes = np.array([0.0, -0.0, np.finfo(dtype).max, np.finfo(dtype).tiny], dtype=dtype)
    else:
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        extremes = np.array([info.min, info.max, 0], dtype=dtype)
    values[: min(count, len(extremes))] = extremes[: min(count, len(extremes))]
    return values.reshape(shape)


def raw_bytes(array: npt.NDArray[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        serialized = serialize_byte_tensor(array)
        return b"" if serialized.size == 0 else serialized.item()
    return np.ascontiguousarray(array, dtype=np.dtype(NUMPY_DTYPE[datatype]).newbyteorder("<")).tobytes()


def raw_request(model: str, inputs: dict[str, tuple[str, npt.NDArray[Any]]], version: str = "",
                outputs: tuple[str, ...] = (), request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in ``raw_input_contents``."""
    return pb.ModelInferRequest(
        model_name=model, model_version=version, id=request_id,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(array.shape))
                for name, (datatype, array) in inputs.items()],
        raw_input_contents=[raw_bytes(array, datatype) for datatype, array in inputs.values()],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
    )


def typed_request(model: str, name: str, datatype: str, array: npt.NDArray[Any]) -> pb.ModelInferRequest:
    """A ModelInferRequest with one input in its typed ``contents`` field."""
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(array.shape))
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())
    return pb.ModelInferRequest(model_name=model, inputs=[tensor])


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    """Output name -> numpy array, from ``raw_output_contents``."""
    assert len(response.raw_output_contents) == len(response.outputs)
    decoded: dict[str, npt.NDArray[Any]] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            flat = deserialize_bytes_tensor(raw) if raw else np.empty(0, dtype=np.object_)
            decoded[tensor.name] = flat.reshape(shape)
        else:
            dtype = np.dtype(NUMPY_DTYPE[tensor.datatype]).newbyteorder("<")
            decoded[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return decoded


def infer_input(name: str, array: npt.NDArray[Any], datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@contextlib.contextmanager
def stub_for(service: ServiceHandle) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def assert_no_traceback(message: str) -> None:
    leaked = [m for m in TRACEBACK_MARKERS if m in message]
    assert not leaked, f"error message leaks internals ({leaked}): {message!r}"


def expect_error(call: Callable[[], Any], code: grpc.StatusCode, *fragments: str) -> str:
    """Run ``call``; it must fail with ``code`` and a message holding every fragment."""
    try:
        call()
    except grpc.RpcError as exc:
        details = exc.details() or ""  # type: ignore[attr-defined]
        assert exc.code() == code, f"expected {code}, got {exc.code()}: {details}"  # type: ignore[attr-defined]
        for fragment in fragments:
            assert fragment in details, f"{fragment!r} not in error message {details!r}"
        assert_no_traceback(details)
        return details
    raise AssertionError(f"expected {code}, but the call succeeded")


def check_still_serving(service: ServiceHandle) -> None:
    """A good inference right after a bad request succeeds, and the process is alive."""
    with stub_for(service) as stub:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        response = stub.ModelInfer(raw_request("identity_fp32", {"x": ("FP32", x)}), timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(decode_outputs(response)["y"], x)
    assert service.process.alive()
