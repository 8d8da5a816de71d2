"""Protobuf ⇄ data-plane objects. Raw tensors become zero-copy numpy views of the request bytes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
from google.protobuf.message import DecodeError

from mesh.protocol import MODEL_HEADER, VERSION_HEADER, clip
from protos.inference import grpc_service_pb2 as pb
from protos.inference import model_config_pb2 as mc
from services import datatypes
from services.errors import InvalidRequestError
from services.model import PLATFORM
from services.routing import routed_version
from services.served import ServedVersion
from services.stats import Duration
from services.types import InferInput, InferRequest, InferResponse, ParameterValue, TensorSpec

# Which InferTensorContents field carries each datatype when typed contents are used.
_CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# The element limit when the caller does not pass the service's own (64 MiB, the default
# max_message_mb): see datatypes.check_shape.
DEFAULT_MAX_ELEMENTS: Final = 64 * 1024 * 1024


def parse_request(data: bytes | pb.ModelInferRequest) -> pb.ModelInferRequest:
    """The request of a ModelInfer call, parsed here rather than by gRPC (the servicer registers an
    identity deserializer): gRPC answers a frame that does not parse with INTERNAL and, measured on
    grpcio 1.85, keeps memory for every such frame."""
    if isinstance(data, pb.ModelInferRequest):
        return data
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError:
        raise InvalidRequestError(
            f"request is not a valid ModelInferRequest ({len(data)} bytes that do not parse as one)") from None


def parameters_from(params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    out: dict[str, ParameterValue] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def parameters_to(params: Mapping[str, ParameterValue], target: Any) -> None:
    for key, value in params.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], count: int
                   ) -> np.ndarray[Any, Any]:
    datatype, name = tensor.datatype, tensor.name
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        datatypes.to_numpy(datatype)  # unknown names get their own message
        raise InvalidRequestError(
            f"input '{clip(name)}': datatype {datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidRequestError(
            f"input '{clip(name)}': contents.{field} has {len(values)} elements, expected {count} "
            f"for shape {list(shape)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        for index, value in enumerate(values):  # filled in place: no second list as large as the array
            array[index] = datatypes.utf8(value, name, index)
        return array.reshape(shape)
    dtype = datatypes.to_numpy(datatype)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise InvalidRequestError(f"input '{clip(name)}': value out of range for {datatype}: {exc}") from None


def routing_headers(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, str]:
    """The gateway's routing headers of a call: (model name, version), "" where absent."""
    name = version = ""
    for key, value in metadata or ():
        if key == MODEL_HEADER:
            name = value if isinstance(value, str) else value.decode()
        elif key == VERSION_HEADER:
            version = value if isinstance(value, str) else value.decode()
    return name, version


def request_from(msg: pb.ModelInferRequest, deadline: float | None, headers: tuple[str, str] = ("", ""),
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> InferRequest:
    """``headers`` are the routing headers: through the gateway, ``x-model-version`` says which
    version the route chose; the body must agree with them. ``max_elements`` bounds every input's
    element count (the service passes its max message size, see datatypes.check_shape)."""
    version = routed_version(msg.model_name, msg.model_version, headers)
    raw = msg.raw_input_contents[:]
    tensors = msg.inputs[:]
    if raw:
        if len(raw) != len(tensors):
            raise InvalidRequestError(
                f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; "
                "send every input raw, or none"
            )
        for tensor in tensors:
            # KServe v2 makes them exclusive: taking the raw bytes would silently drop the typed
            # values the client meant to send.
            if tensor.HasField("contents"):
                raise InvalidRequestError(
                    f"input '{clip(tensor.name)}' has typed contents while raw_input_contents is set; "
                    "send every input in raw_input_contents, or every input in contents, not both")
    inputs: list[InferInput] = []
    for index, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        shape = tuple(tensor.shape[:])  # a slice of a repeated field first: 4x faster than iterating it
        count = datatypes.check_shape(name, shape, max_elements)  # before anything is sized by it
        data = (datatypes.from_raw(name, datatype, shape, count, raw[index]) if raw
                else _from_contents(tensor, shape, count))
        inputs.append(InferInput(name, datatype, shape, data))
    requested = msg.outputs[:]
    return InferRequest(msg.model_name, version, inputs,
                        [o.name for o in requested], msg.id,
                        parameters_from(msg.parameters) if msg.parameters else {}, deadline)


def response_to(response: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=response.model, model_version=str(response.version), id=response.id)
    tensors, raw = msg.outputs, msg.raw_output_contents
    for output in response.outputs:  # add() and assignments: half the time of nested constructors
        tensor = tensors.add()
        tensor.name = output.name
        tensor.datatype = output.datatype
        tensor.shape.extend(output.shape)
        raw.append(datatypes.to_raw(output.data))
    if response.parameters:
        parameters_to(response.parameters, msg.parameters)
    return msg


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in specs]


def model_config(served: ServedVersion) -> mc.ModelConfig:
    """Triton's view of the model: with batching on, dims leave out the batch dimension."""
    model = served.model
    config = model.config
    batching = model.max_batch_size > 0

    def dims(spec: TensorSpec) -> list[int]:
        return list(spec.shape[1:] if batching else spec.shape)

    msg = mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=model.max_batch_size,
        input=[mc.ModelInput(name=s.name, data_type=datatypes.TRITON_TYPE[s.datatype],
                             dims=dims(s)) for s in model.inputs],
        output=[mc.ModelOutput(name=s.name, data_type=datatypes.TRITON_TYPE[s.datatype],
                               dims=dims(s)) for s in model.outputs],
        instance_group=[mc.ModelInstanceGroup(name=f"{model.name}_0", count=config.instances,
                                              kind=mc.ModelInstanceGroup.KIND_CPU)],
    )
    policy = config.version_policy
    if policy.latest is not None:
        msg.version_policy.latest.num_versions = policy.latest
    elif policy.specific is not None:
        msg.version_policy.specific.versions.extend(policy.specific)
    else:
        msg.version_policy.all.SetInParent()
    if batching:
        batching_cfg = config.dynamic_batching
        msg.dynamic_batching.max_queue_delay_microseconds = batching_cfg.max_queue_delay_us
        msg.dynamic_batching.preferred_batch_size.extend(batching_cfg.preferred_batch_sizes)
    for key, value in config.labels.items():
        msg.parameters[key].string_value = value
    return msg


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(served: ServedVersion) -> pb.ModelStatistics:
    served.flush()
    s = served.stats
    return pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success), fail=_duration(s.fail), queue=_duration(s.queue),
            compute_input=_duration(s.compute_input), compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
                     for size, d in sorted(s.batches.items())],
    )
