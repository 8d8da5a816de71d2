"""KServe v2 datatypes: mapping to numpy and ONNX, raw byte decoding and BYTES framing."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from math import prod
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from mesh.protocol import clip
from services.errors import InvalidRequestError, UnsupportedError

# KServe datatype name -> numpy dtype (little-endian, as the wire format is). BYTES is an object
# array of ``bytes``; BF16 has no numpy dtype of its own and is refused where it is needed.
_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

_FROM_NUMPY: Final[dict[str, str]] = {
    np.dtype(np.bool_).str: "BOOL",
    **{dtype.str: name for name, dtype in _NUMPY.items() if name not in ("BOOL", "BYTES")},
}

# ONNX tensor element type as ONNX Runtime reports it ("tensor(float)") -> KServe name.
_ONNX: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}

# Triton model-config enum names (ModelConfig RPC) for each KServe datatype.
TRITON_TYPE: Final[dict[str, str]] = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}

ALL_DATATYPES: Final[tuple[str, ...]] = (*_NUMPY.keys(), "BF16")


def from_onnx(onnx_type: str) -> str:
    """KServe datatype of an ONNX Runtime type string such as ``tensor(float)``."""
    try:
        return _ONNX[onnx_type]
    except KeyError:
        raise UnsupportedError(f"ONNX type {onnx_type} has no KServe v2 datatype") from None


def to_numpy(datatype: str) -> np.dtype[Any]:
    try:
        return _NUMPY[datatype]
    except KeyError:
        if datatype == "BF16":
            raise UnsupportedError("datatype BF16 is not supported by ONNX Runtime's Python API") from None
        raise InvalidRequestError(
            f"unknown datatype '{clip(datatype)}'; expected one of {', '.join(ALL_DATATYPES)}"
        ) from None


def from_numpy(array: npt.NDArray[Any]) -> str:
    """KServe datatype of an output array from ONNX Runtime."""
    if array.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    try:
        return _FROM_NUMPY[array.dtype.newbyteorder("<").str if array.dtype.byteorder == ">" else array.dtype.str]
    except KeyError:
        raise UnsupportedError(f"output dtype {array.dtype} has no KServe v2 datatype") from None


# numpy's own limit on dimensions (NPY_MAXDIMS); a tensor with more cannot even be described.
MAX_DIMS: Final = 64
# Every element of a tensor costs at least one byte of the request (a BOOL or INT8 raw, a varint
# in typed contents, a 4-byte length prefix for BYTES), so a request can never carry more elements
# than it has bytes: the service caps the element count at its largest message.
BYTES_PREFIX: Final = 4


def element_count(shape: Sequence[int]) -> int:
    return prod(shape)


def check_shape(name: str, shape: Sequence[int], max_elements: int) -> int:
    """The element count of ``shape`` once it passed the one shape rule, checked before anything is
    allocated for it: at most :data:`MAX_DIMS` dimensions, none negative, and every dimension as
    well as the product of the non-zero ones at most ``max_elements``. The product leaves out
    zeros because ``[0, 2**62, 2**62]`` holds no element and still cannot be made into an array
    (numpy refuses the dimensions); stopping at the first product over the bound also keeps the
    arithmetic small whatever the client declared."""
    if len(shape) > MAX_DIMS:
        raise InvalidRequestError(
            f"input '{clip(name)}': shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    product = 1
    empty = False
    for dim in shape:
        if dim < 0:
            raise InvalidRequestError(f"input '{clip(name)}': shape {list(shape)} has a negative dimension")
        if dim == 0:
            empty = True
            continue
        product *= dim
        if product > max_elements:
            raise InvalidRequestError(
                f"input '{clip(name)}': shape {list(shape)} declares more than {max_elements} elements, "
                f"the most a request of at most {max_elements} bytes (the service's max message size) can carry")
    return 0 if empty else product


def decode_bytes(raw: bytes | memoryview, count: int, name: str) -> npt.NDArray[np.object_]:
    """Split BYTES framing (4-byte little-endian length, then the bytes) into ``count`` elements.

    ONNX Runtime's string tensors hold UTF-8 text, so each element is decoded to ``str`` here
    (it would silently store ``"b'...'"`` for a ``bytes`` object otherwise).
    """
    view = memoryview(raw)
    total = len(view)
    # Checked before the array is made: its size comes from the client's shape, and only the bytes
    # actually present say how many elements there can be.
    if count * BYTES_PREFIX > total:
        raise InvalidRequestError(
            f"input '{clip(name)}': {count} BYTES elements need at least {count * BYTES_PREFIX} bytes "
            f"(a {BYTES_PREFIX}-byte length prefix each), but the data is {total} bytes"
        )
    out = np.empty(count, dtype=np.object_)
    offset = 0
    for index in range(count):
        if offset + 4 > total:
            raise InvalidRequestError(
                f"input '{clip(name)}': BYTES data ends after {index} of {count} elements "
                f"(no 4-byte length prefix at offset {offset})"
            )
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > total:
            raise InvalidRequestError(
                f"input '{clip(name)}': BYTES element {index} declares {length} bytes but only "
                f"{total - offset} remain"
            )
        out[index] = utf8(bytes(view[offset : offset + length]), name, index)
        offset += length
    if offset != total:
        raise InvalidRequestError(
            f"input '{clip(name)}': {total - offset} bytes left over after {count} BYTES elements"
        )
    return out


def utf8(data: bytes, name: str, index: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"input '{clip(name)}': BYTES element {index} is not valid UTF-8 (byte {exc.start}); "
            "ONNX Runtime string tensors hold UTF-8 text"
        ) from None


def encode_bytes(array: npt.NDArray[Any]) -> bytes:
    """BYTES framing of an array of str/bytes, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def to_raw(array: npt.NDArray[Any]) -> bytes:
    """Row-major little-endian bytes of an output array, as ``raw_output_contents`` carries them."""
    dtype = array.dtype
    if dtype.kind in ("O", "U", "S"):
        return encode_bytes(array)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
    return array.tobytes()  # row-major whatever the array's layout


def from_raw(name: str, datatype: str, shape: tuple[int, ...], count: int, raw: bytes | memoryview
             ) -> npt.NDArray[Any]:
    """The array of one input sent as raw bytes (gRPC's raw_input_contents, REST's binary
    extension): ``count`` elements of ``datatype`` (from :func:`check_shape`), zero-copy where the
    datatype allows. The byte length is checked before anything is made from ``shape``."""
    if datatype == "BYTES":
        return decode_bytes(raw, count, name).reshape(shape)
    dtype = to_numpy(datatype)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidRequestError(
            f"input '{clip(name)}': raw data is {len(raw)} bytes, expected {expected} "
            f"({count} x {datatype} for shape {list(shape)})"
        )
    if datatype == "BOOL":
        check_bool(name, raw)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def check_bool(name: str, raw: bytes | memoryview) -> None:
    """A numpy bool is one byte read as-is: any byte but 0 and 1 would reach the model (and come back
    in an Identity's answer) as neither true nor false."""
    values = np.frombuffer(raw, dtype=np.uint8)
    bad = np.flatnonzero(values > 1)
    if bad.size:
        index = int(bad[0])
        raise InvalidRequestError(
            f"input '{clip(name)}': BOOL element {index} is byte {values[index]}; "
            "BOOL raw data holds 0 or 1 per element")
