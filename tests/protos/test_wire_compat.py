"""Our ``protos/inference`` schema must be wire-compatible with Triton's.

The reference is the compiled schema that tritonclient ships
(``tritonclient.grpc.service_pb2`` / ``model_config_pb2``). Both are imported into
this one process together with our modules, which only works because ours live in
a private descriptor pool (see ``protos/inference/_pool.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from protos.inference import _pool
from protos.inference import grpc_service_pb2 as ours_service
from protos.inference import grpc_service_pb2_grpc as ours_grpc
from protos.inference import model_config_pb2 as ours_config

FILE_PAIRS = [
    pytest.param(triton_config, ours_config, id="model_config"),
    pytest.param(triton_service, ours_service, id="grpc_service"),
]


def _file_proto(module: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


# ---------------------------------------------------------------------------
# Structural comparison of descriptors
# ---------------------------------------------------------------------------


def _enum_shape(enum: descriptor_pb2.EnumDescriptorProto) -> dict[str, Any]:
    return {
        "values": {v.name: v.number for v in enum.value},
        "allow_alias": enum.options.allow_alias,
        "reserved": sorted((r.start, r.end) for r in enum.reserved_range),
    }


def _field_shape(message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto) -> dict:
    oneof = None
    if field.HasField("oneof_index"):
        oneof = message.oneof_decl[field.oneof_index].name
    return {
        "number": field.number,
        "type": descriptor_pb2.FieldDescriptorProto.Type.Name(field.type),
        "label": descriptor_pb2.FieldDescriptorProto.Label.Name(field.label),
        "type_name": field.type_name,  # fully qualified (".inference.X"): maps/enums/messages match by name
        "oneof": oneof,
        "proto3_optional": field.proto3_optional,
        "default_value": field.default_value,
        "packed": field.options.packed if field.options.HasField("packed") else None,
    }


def _message_shape(message: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    """Everything about a message that affects the wire format or the generated API."""
    return {
        "fields": {f.name: _field_shape(message, f) for f in message.field},
        "oneofs": sorted(o.name for o in message.oneof_decl),
        "map_entry": message.options.map_entry,
        "nested": {n.name: _message_shape(n) for n in message.nested_type},
        "enums": {e.name: _enum_shape(e) for e in message.enum_type},
        "reserved": sorted((r.start, r.end) for r in message.reserved_range),
        "reserved_names": sorted(message.reserved_name),
        "extension_ranges": sorted((r.start, r.end) for r in message.extension_range),
    }


def _top_level_names(module: Any) -> list[str]:
    proto = _file_proto(module)
    return [m.name for m in proto.message_type] + [e.name for e in proto.enum_type]


def _message_params() -> Iterator[Any]:
    for triton, ours in ((triton_config, ours_config), (triton_service, ours_service)):
        for msg in _file_proto(triton).message_type:
            yield pytest.param(triton, ours, msg.name, id=msg.name)


@pytest.mark.parametrize(("triton", "ours"), FILE_PAIRS)
def test_file_level_facts(triton: Any, ours: Any) -> None:
    theirs_fp, ours_fp = _file_proto(triton), _file_proto(ours)
    assert ours_fp.package == theirs_fp.package == "inference"
    assert ours_fp.syntax == theirs_fp.syntax == "proto3"
    assert sorted(_top_level_names(ours)) == sorted(_top_level_names(triton))
    assert [s.name for s in ours_fp.service] == [s.name for s in theirs_fp.service]


@pytest.mark.parametrize(("triton", "ours", "name"), list(_message_params()))
def test_message_matches_triton(triton: Any, ours: Any, name: str) -> None:
    theirs_msg = next(m for m in _file_proto(triton).message_type if m.name == name)
    ours_msg = next((m for m in _file_proto(ours).message_type if m.name == name), None)
    assert ours_msg is not None, f"message inference.{name} is missing"
    assert _message_shape(ours_msg) == _message_shape(theirs_msg)


@pytest.mark.parametrize(("triton", "ours"), FILE_PAIRS)
def test_top_level_enums_match_triton(triton: Any, ours: Any) -> None:
    theirs = {e.name: _enum_shape(e) for e in _file_proto(triton).enum_type}
    mine = {e.name: _enum_shape(e) for e in _file_proto(ours).enum_type}
    assert mine == theirs


def test_service_matches_triton() -> None:
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = ours_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"

    def methods(service: Any) -> dict[str, tuple[str, str, bool, bool]]:
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in service.methods
        }

    assert methods(ours) == methods(theirs)
    assert len(ours.methods) == 20
    assert methods(ours)["ModelStreamInfer"] == (
        "inference.ModelInferRequest",
        "inference.ModelStreamInferResponse",
        True,
        True,
    )


# ---------------------------------------------------------------------------
# Round trips through the two implementations
# ---------------------------------------------------------------------------

# Enough variants that every member of every oneof (InferParameter has 5) is chosen once.
VARIANTS = range(5)


def _scalar(field: FieldDescriptor, seed: int) -> Any:
    """A non-default value for ``field`` that exercises its full width and sign."""
    t = field.type
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return -(2**31) + seed
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return -(2**62) - seed
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return 2**32 - 1 - seed
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 2**64 - 1 - seed
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.5 + seed  # exactly representable in float32
    if t == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{seed}-\u00e9"
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes([seed % 256, 0, 255]) + field.name.encode()
    if t == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number  # last value: non-zero when the enum has more than one
    raise AssertionError(f"unhandled field type {t} for {field.full_name}")


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def populate(msg: Message, variant: int, seed: int = 1) -> Message:
    """Set every field of ``msg`` (recursively); oneofs get member ``variant % size``."""
    desc: Descriptor = msg.DESCRIPTOR
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[variant % len(oneof.fields)] is not field:
            continue
        seed += 1
        value = getattr(msg, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            key_field = field.message_type.fields_by_name["key"]
            for i in range(2):
                key = _scalar(key_field, seed + i)
                if value_field.message_type is not None:
                    populate(value[key], variant, seed + i)
                else:
                    value[key] = _scalar(value_field, seed + i)
        elif field.is_repeated:
            for i in range(2):
                if field.message_type is not None:
                    populate(value.add(), variant, seed + i)
                else:
                    value.append(_scalar(field, seed + i))
        elif field.message_type is not None:
            populate(value, variant, seed)
            value.SetInParent()  # empty messages (e.g. ModelVersionPolicy.All) must still be present
        else:
            setattr(msg, field.name, _scalar(field, seed))
    return msg


def assert_fully_populated(msg: Message) -> None:
    desc = msg.DESCRIPTOR
    present = {f.name for f, _ in msg.ListFields()}
    for field in desc.fields:
        # A proto3 enum whose only value is 0 (e.g. SecondaryDeviceKind) cannot be non-default.
        single_valued_enum = field.enum_type is not None and len(field.enum_type.values) == 1
        if field.containing_oneof is None and not single_valued_enum:
            assert field.name in present, f"{field.full_name} was not populated"
    for oneof in desc.oneofs:
        assert msg.WhichOneof(oneof.name) is not None, f"{desc.full_name}.{oneof.name} unset"
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if _is_map(field):
            items = value.values() if field.message_type.fields_by_name["value"].message_type else []
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            assert_fully_populated(item)


def _ours(name: str) -> type[Message]:
    return getattr(ours_service, name, None) or getattr(ours_config, name)


def _theirs(name: str) -> type[Message]:
    return getattr(triton_service, name, None) or getattr(triton_config, name)


KEY_MESSAGES = [
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelStreamInferResponse",
    "ModelConfigResponse",
    "ModelMetadataResponse",
]
ALL_MESSAGES = [m.name for m in _file_proto(triton_service).message_type] + [
    m.name for m in _file_proto(triton_config).message_type
]


def _round_trip(src_cls: type[Message], dst_cls: type[Message], variant: int) -> None:
    original = populate(src_cls(), variant)
    assert_fully_populated(original)
    wire = original.SerializeToString(deterministic=True)

    parsed = dst_cls.FromString(wire)
    # Text format names every field; a field the other side did not recognise would
    # land in unknown fields and be missing here.
    assert text_format.MessageToString(parsed) == text_format.MessageToString(original)
    assert parsed.SerializeToString(deterministic=True) == wire

    back = src_cls.FromString(parsed.SerializeToString(deterministic=True))
    assert back == original
    assert back.SerializeToString(deterministic=True) == wire


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", KEY_MESSAGES)
def test_key_messages_round_trip_ours_to_triton(name: str, variant: int) -> None:
    _round_trip(_ours(name), _theirs(name), variant)


@pytest.mark.parametrize("name", ALL_MESSAGES)
def test_every_message_round_trips_both_ways(name: str) -> None:
    for variant in VARIANTS:
        _round_trip(_ours(name), _theirs(name), variant)
        _round_trip(_theirs(name), _ours(name), variant)


def test_stream_response_carries_error_and_response() -> None:
    ours = ours_service.ModelStreamInferResponse(
        error_message="model 'm' is not ready",
        infer_response=ours_service.ModelInferResponse(model_name="m", id="req-7"),
    )
    theirs = triton_service.ModelStreamInferResponse.FromString(ours.SerializeToString())
    assert theirs.error_message == "model 'm' is not ready"
    assert theirs.infer_response.model_name == "m"
    assert theirs.infer_response.id == "req-7"


def test_tritonclient_decodes_our_raw_output() -> None:
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    names = np.array([b"a", b"bc"], dtype=np.object_)
    ours = ours_service.ModelInferResponse(model_name="m", model_version="1", id="x")
    out = ours.outputs.add(name="y", datatype="FP32", shape=[2, 3])
    out.parameters["classification"].bool_param = False
    ours.outputs.add(name="labels", datatype="BYTES", shape=[2])
    ours.raw_output_contents.append(data.tobytes())
    ours.raw_output_contents.append(b"".join(len(s).to_bytes(4, "little") + s for s in names))

    theirs = triton_service.ModelInferResponse.FromString(ours.SerializeToString())
    result = triton_grpc.InferResult(theirs)
    np.testing.assert_array_equal(result.as_numpy("y"), data)
    np.testing.assert_array_equal(result.as_numpy("labels"), names)


# ---------------------------------------------------------------------------
# The private pool: both schemas in one process
# ---------------------------------------------------------------------------


def test_descriptors_live_in_private_pool() -> None:
    for module in (ours_service, ours_config):
        assert module.DESCRIPTOR.pool is _pool.POOL
    # The default pool keeps tritonclient's copy, under its own file name.
    default = descriptor_pool.Default()
    assert default.FindFileContainingSymbol("inference.ModelInferRequest").name == "grpc_service.proto"
    assert _pool.POOL.FindMessageTypeByName("inference.ModelInferRequest") is (
        ours_service.ModelInferRequest.DESCRIPTOR
    )
    fd: FileDescriptor = ours_service.DESCRIPTOR
    assert fd.name == "protos/inference/grpc_service.proto"
    assert [d.name for d in fd.dependencies] == ["protos/inference/model_config.proto"]


def test_classes_are_distinct_but_usable_side_by_side() -> None:
    assert ours_service.ModelInferRequest is not triton_service.ModelInferRequest
    ours = ours_service.ModelInferRequest(model_name="m")
    ours.parameters["sequence_id"].int64_param = 42
    theirs = triton_service.ModelInferRequest()
    theirs.ParseFromString(ours.SerializeToString())
    assert theirs.parameters["sequence_id"].int64_param == 42
    # Mixing classes across pools is rejected by protobuf, as it should be.
    with pytest.raises(TypeError):
        ours_service.ModelStreamInferResponse(infer_response=triton_service.ModelInferResponse())


class _Servicer(ours_grpc.GRPCInferenceServiceServicer):
    """Just enough of a server for tritonclient to exercise three RPCs."""

    def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        return ours_service.ServerLiveResponse(live=True)

    def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        config = ours_config.ModelConfig(name=request.name, backend="onnxruntime", max_batch_size=8)
        config.input.add(name="x", data_type=ours_config.TYPE_FP32, dims=[-1, 4])
        config.dynamic_batching.preferred_batch_size.append(4)
        return ours_service.ModelConfigResponse(config=config)

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        (tensor,) = request.inputs
        doubled = np.frombuffer(request.raw_input_contents[0], dtype=np.float32) * 2
        response = ours_service.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=tensor.shape)
        response.raw_output_contents.append(doubled.tobytes())
        return response


def test_tritonclient_talks_to_our_servicer() -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ours_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()

        config = client.get_model_config("m", as_json=True)["config"]
        assert config["name"] == "m"
        assert config["backend"] == "onnxruntime"
        assert config["input"][0]["data_type"] == "TYPE_FP32"
        assert config["dynamic_batching"]["preferred_batch_size"] == [4]

        data = np.arange(8, dtype=np.float32).reshape(2, 4)
        inp = triton_grpc.InferInput("x", list(data.shape), "FP32")
        inp.set_data_from_numpy(data)
        result = client.infer("m", [inp], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("y"), data * 2)
        assert result.get_response().id == "r1"

        # An RPC we do not implement surfaces as UNIMPLEMENTED, not as an unknown method.
        with pytest.raises(triton_grpc.InferenceServerException) as excinfo:
            client.get_trace_settings()
        assert "UNIMPLEMENTED" in str(excinfo.value.status())
        client.close()
    finally:
        server.stop(grace=None)
