"""KServe v2 REST tensors ⇄ data-plane objects: JSON (``data`` nested or flat) and Triton's binary
tensor extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then each binary
tensor's bytes in order, ``binary_data_size`` long; little-endian, row-major, BYTES
length-prefixed).

Every check runs before anything is sized by the client's declarations: shapes pass
:func:`services.datatypes.check_shape`, binary sections are sliced from the bytes present (never
allocated from a shape), and JSON arrays are flattened one level at a time with at most
:data:`services.datatypes.MAX_DIMS` levels.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from mesh.protocol import clip
from services import datatypes
from services.errors import InvalidRequestError, UnsupportedError
from services.routing import routed_version
from services.types import InferInput, InferRequest, InferResponse, ParameterValue

HEADER_LENGTH: Final = "inference-header-content-length"
"""Triton's binary extension: the length of the JSON part of a body (request and answer)."""

# Request parameters that steer the transport, not the model (Triton's names).
BINARY_OUTPUT: Final = "binary_data_output"
BINARY_SIZE: Final = "binary_data_size"
TIMEOUT: Final = "timeout"
"""Request parameter: microseconds the request may take (tritonclient's ``timeout``)."""

_INTEGER_KINDS: Final = frozenset({int})
_FLOAT_KINDS: Final = frozenset({int, float})
_BOOL_KINDS: Final = frozenset({bool})
_JSON_NAMES: Final[dict[type, str]] = {
    bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "an array",
    dict: "an object", type(None): "null",
}


@dataclass(frozen=True, slots=True)
class AnswerFormat:
    """How the answer carries each output: JSON ``data`` or a binary section."""

    binary_default: bool
    binary: dict[str, bool]
    """Per requested output: its own ``binary_data`` parameter, where it set one."""

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def split_body(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary sections of a body (all JSON without the header)."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    text = header_length.strip()
    if not text.isdigit() or len(text) > 18:
        raise InvalidRequestError(
            f"header Inference-Header-Content-Length '{clip(header_length)}' is not a byte count")
    length = int(text)
    if length > len(view):
        raise InvalidRequestError(
            f"header Inference-Header-Content-Length is {length} but the body is only {len(view)} bytes")
    return view[:length], view[length:]


def parse_json(data: bytes | memoryview, what: str = "request body") -> Any:
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise InvalidRequestError(f"{what} nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequestError(f"{what} is not valid JSON: {clip(str(exc))}") from None


def _kind(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _field(doc: dict[str, Any], key: str, kinds: tuple[type, ...], where: str, default: Any = None) -> Any:
    value = doc.get(key, default)
    if value is default:
        return value
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise InvalidRequestError(f"{where}: '{key}' must be {expected}, not {_kind(value)}")
    return value


def parameters(value: Any, where: str) -> dict[str, ParameterValue]:
    """A ``parameters`` object: string keys, scalar values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{where}: 'parameters' must be an object, not {_kind(value)}")
    out: dict[str, ParameterValue] = {}
    for key, item in value.items():
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidRequestError(
                f"{where}: parameter '{clip(key)}' must be a string, number or true/false, not {_kind(item)}")
        out[key] = item
    return out


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidRequestError(f"{where}: 'shape' must be an array of integers, not {_kind(value)}")
    if len(value) > datatypes.MAX_DIMS:
        raise InvalidRequestError(
            f"{where}: shape has {len(value)} dimensions; at most {datatypes.MAX_DIMS} are allowed")
    if any(type(dim) is not int for dim in value):
        raise InvalidRequestError(f"{where}: 'shape' must be an array of integers")
    return tuple(value)


def flatten(data: Any, name: str) -> list[Any]:
    """The elements of ``data``, flat or nested arrays, in row-major order."""
    if not isinstance(data, list):
        raise InvalidRequestError(f"input '{clip(name)}': 'data' must be an array, not {_kind(data)}")
    level: list[Any] = data
    depth = 1
    while level and isinstance(level[0], list):
        if any(type(item) is not list for item in level):
            raise InvalidRequestError(f"input '{clip(name)}': 'data' mixes arrays and values at depth {depth}")
        depth += 1
        if depth > datatypes.MAX_DIMS:
            raise InvalidRequestError(
                f"input '{clip(name)}': 'data' nests deeper than {datatypes.MAX_DIMS} arrays")
        level = list(itertools.chain.from_iterable(level))
    return level


def _json_kinds(datatype: str) -> tuple[frozenset[type], str]:
    if datatype == "BOOL":
        return _BOOL_KINDS, "true/false"
    if datatype.startswith(("INT", "UINT")):
        return _INTEGER_KINDS, "integers"
    return _FLOAT_KINDS, "numbers"


def from_json(name: str, datatype: str, shape: tuple[int, ...], count: int, data: Any, *,
              params: dict[str, ParameterValue]) -> npt.NDArray[Any]:
    """The array of one input sent as JSON ``data``."""
    flat = flatten(data, name)
    if len(flat) != count:
        raise InvalidRequestError(
            f"input '{clip(name)}': data has {len(flat)} elements, expected {count} for shape {list(shape)}")
    if datatype == "BYTES":
        return _bytes_from_json(name, flat, params.get("content_type")).reshape(shape)
    dtype = datatypes.to_numpy(datatype)  # unknown and BF16 datatypes get their own message
    allowed, what = _json_kinds(datatype)
    kinds = {type(value) for value in flat}
    wrong = kinds - allowed
    if wrong:
        bad = next(i for i, value in enumerate(flat) if type(value) in wrong)
        raise InvalidRequestError(
            f"input '{clip(name)}': element {bad} is {_kind(flat[bad])}; {datatype} data holds {what}")
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise InvalidRequestError(f"input '{clip(name)}': value out of range for {datatype}: {exc}") from None


def _bytes_from_json(name: str, flat: list[Any], content_type: ParameterValue | None) -> npt.NDArray[np.object_]:
    encoded = content_type == "base64"
    if content_type not in (None, "str", "base64"):
        raise InvalidRequestError(
            f"input '{clip(name)}': content_type '{clip(str(content_type))}' is not str or base64")
    out = np.empty(len(flat), dtype=np.object_)
    for index, value in enumerate(flat):  # filled in place: no second list as large as the array
        if not isinstance(value, str):
            raise InvalidRequestError(
                f"input '{clip(name)}': BYTES element {index} is {_kind(value)}; BYTES data holds strings")
        if encoded:
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequestError(
                    f"input '{clip(name)}': BYTES element {index} is not valid base64") from None
            out[index] = datatypes.utf8(raw, name, index)
        else:
            out[index] = value
    return out


def request_from(doc: Any, binary: memoryview, model: str, version_text: str, headers: tuple[str, str], *,
                 max_elements: int, now: Callable[[], float] = time.monotonic
                 ) -> tuple[InferRequest, AnswerFormat]:
    """The data-plane request of an infer body (``doc`` its parsed JSON, ``binary`` what follows it)
    and how the answer should carry the outputs. ``model``/``version_text`` come from the path."""
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"request body must be a JSON object, not {_kind(doc)}")
    version = routed_version(model, version_text, headers)
    request_id = _field(doc, "id", (str,), "request", "")
    params = parameters(doc.get("parameters"), "request")
    binary_default = params.pop(BINARY_OUTPUT, False)
    if not isinstance(binary_default, bool):
        raise InvalidRequestError(f"request: parameter {BINARY_OUTPUT} must be true or false")
    deadline = None
    timeout = params.pop(TIMEOUT, None)
    if timeout is not None:
        if type(timeout) is not int or timeout < 0:
            raise InvalidRequestError(f"request: parameter {TIMEOUT} must be a count of microseconds")
        deadline = now() + timeout / 1e6 if timeout else None
    tensors = _field(doc, "inputs", (list,), "request")
    if tensors is None:
        raise InvalidRequestError("request has no 'inputs'")
    inputs: list[InferInput] = []
    offset = 0
    for index, tensor in enumerate(tensors):
        where = f"input {index}"
        if not isinstance(tensor, dict):
            raise InvalidRequestError(f"{where} must be an object, not {_kind(tensor)}")
        name = _field(tensor, "name", (str,), where)
        if name is None:
            raise InvalidRequestError(f"{where} has no 'name'")
        where = f"input '{clip(name)}'"
        datatype = _field(tensor, "datatype", (str,), where)
        if datatype is None:
            raise InvalidRequestError(f"{where} has no 'datatype'")
        if "shape" not in tensor:
            raise InvalidRequestError(f"{where} has no 'shape'")
        shape = _shape(tensor["shape"], where)
        count = datatypes.check_shape(name, shape, max_elements)  # before anything is sized by it
        tensor_params = parameters(tensor.get("parameters"), where)
        size = tensor_params.get(BINARY_SIZE)
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidRequestError(f"{where}: parameter {BINARY_SIZE} must be a byte count")
            if "data" in tensor:
                raise InvalidRequestError(f"{where} has both 'data' and parameter {BINARY_SIZE}; send one")
            if offset + size > len(binary):
                raise InvalidRequestError(
                    f"{where}: {BINARY_SIZE} {size} runs past the end of the body: {len(binary)} bytes "
                    f"follow the JSON header, {offset} of them taken by earlier inputs")
            data = datatypes.from_raw(name, datatype, shape, count, binary[offset:offset + size])
            offset += size
        elif "data" in tensor:
            data = from_json(name, datatype, shape, count, tensor["data"], params=tensor_params)
        else:
            raise InvalidRequestError(f"{where} has neither 'data' nor parameter {BINARY_SIZE}")
        inputs.append(InferInput(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidRequestError(
            f"{len(binary) - offset} bytes after the JSON header belong to no input's {BINARY_SIZE} "
            f"(the inputs claim {offset} of {len(binary)})")
    outputs, binary_outputs = _requested(_field(doc, "outputs", (list,), "request", []))
    return (InferRequest(model, version, inputs, outputs, request_id, params, deadline),
            AnswerFormat(binary_default, binary_outputs))


def _requested(requested: list[Any]) -> tuple[list[str], dict[str, bool]]:
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, output in enumerate(requested):
        if not isinstance(output, dict):
            raise InvalidRequestError(f"output {index} must be an object, not {_kind(output)}")
        name = _field(output, "name", (str,), f"output {index}")
        if name is None:
            raise InvalidRequestError(f"output {index} has no 'name'")
        where = f"output '{clip(name)}'"
        params = parameters(output.get("parameters"), where)
        if params.get("classification"):
            raise UnsupportedError(f"{where}: parameter classification is not supported by sluice")
        flag = params.get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidRequestError(f"{where}: parameter binary_data must be true or false")
            binary[name] = flag
        names.append(name)
    return names, binary


def _json_data(array: npt.NDArray[Any]) -> list[Any]:
    flat = array.reshape(-1)
    if flat.dtype.kind in ("O", "S", "U"):
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in flat]
    return flat.tolist()


def response_body(response: InferResponse, answer: AnswerFormat) -> tuple[bytes, int | None]:
    """The answer's body and, when it has binary sections, the length of its JSON header."""
    outputs: list[dict[str, Any]] = []
    sections: list[bytes] = []
    for output in response.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if answer.is_binary(output.name):
            raw = datatypes.to_raw(output.data)
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            sections.append(raw)
        else:
            entry["data"] = _json_data(output.data)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model, "model_version": str(response.version)}
    if response.id:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not sections:
        return header, None
    return b"".join((header, *sections)), len(header)
