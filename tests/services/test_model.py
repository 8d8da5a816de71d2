"""OnnxModel: signature, batching decision, request validation, load and warm-up errors (as a unit,
and warm-up in the real service)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from onnx import TensorProto, helper, numpy_helper

from services.config import ExecutionProvider, ModelConfig, WarmupInput
from services.errors import InvalidRequestError, ModelLoadError
from services.model import DEFAULT_MAX_BATCH, OnnxModel, signature_conflicts
from services.types import InferInput, TensorSpec
from tests.fixtures.service import ServiceHandle
from tests.services import models


def _load(tmp_path: Path, model: object, config: ModelConfig | None = None, name: str = "m") -> OnnxModel:
    path = models.write_model(tmp_path, name, model)  # type: ignore[arg-type]
    return OnnxModel(name, 1, path, config or ModelConfig())


def _input(name: str, datatype: str, shape: tuple[int, ...]) -> InferInput:
    return InferInput(name, datatype, shape, np.zeros(shape, dtype=np.float32))


def test_signature_uses_minus_one_for_dynamic_dims(tmp_path: Path) -> None:
    model = _load(tmp_path, models.arithmetic())
    assert model.inputs == (TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "FP32", (-1, 3)))
    assert [o.name for o in model.outputs] == ["sum", "difference", "product"]
    assert model.max_batch_size == DEFAULT_MAX_BATCH
    assert len(model.sha256) == 64


@pytest.mark.parametrize(("builder", "config", "expected"), [
    (models.fixed_first_dim, ModelConfig(), 0),
    (models.column_sum, ModelConfig(), 0),
    (models.column_sum, ModelConfig(max_batch_size=8), 0),
    (models.arithmetic, ModelConfig(max_batch_size=0), 0),
    (models.arithmetic, ModelConfig(max_batch_size=4), 4),
])
def test_batching_only_where_every_first_dim_is_dynamic(tmp_path: Path, builder: object, config: ModelConfig,
                                                        expected: int) -> None:
    assert _load(tmp_path, builder(), config).max_batch_size == expected  # type: ignore[operator]


def test_output_with_another_dynamic_dim_is_not_batched(tmp_path: Path) -> None:
    # Batched, merged requests would fail with INTERNAL, or be sliced wrongly when M equals the rows.
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M"])], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    assert _load(tmp_path, model).max_batch_size == 0


def test_validate_returns_rows_and_names_problems(tmp_path: Path) -> None:
    model = _load(tmp_path, models.arithmetic(), ModelConfig(max_batch_size=4))
    assert model.validate([_input("a", "FP32", (3, 3)), _input("b", "FP32", (3, 3))], ["sum"]) == 3
    cases = [
        ([_input("a", "FP32", (1, 3))], [], "missing input(s) 'b'"),
        ([_input("a", "FP32", (1, 3)), _input("z", "FP32", (1, 3))], [], "unknown input 'z'"),
        ([_input("a", "FP64", (1, 3)), _input("b", "FP32", (1, 3))], [], "expected datatype FP32, got FP64"),
        ([_input("a", "FP32", (1, 4)), _input("b", "FP32", (1, 3))], [], "expected shape [-1, 3], got [1, 4]"),
        ([_input("a", "FP32", (5, 3)), _input("b", "FP32", (5, 3))], [], "exceeds max_batch_size 4"),
        ([_input("a", "FP32", (1, 3)), _input("b", "FP32", (1, 3))], ["nope"], "unknown output 'nope'"),
    ]
    for inputs, outputs, fragment in cases:
        with pytest.raises(InvalidRequestError) as caught:
            model.validate(inputs, outputs)
        assert fragment in str(caught.value)


def test_run_matches_onnx_runtime(tmp_path: Path) -> None:
    model = _load(tmp_path, models.arithmetic())
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 3, dtype=np.float32)
    session = ort.InferenceSession(models.arithmetic().SerializeToString(), providers=["CPUExecutionProvider"])
    for got, expected in zip(model.run({"a": a, "b": b}), session.run(None, {"a": a, "b": b}), strict=True):
        np.testing.assert_array_equal(got, expected)
    (product,) = model.run({"a": a, "b": b}, ["product"])
    np.testing.assert_array_equal(product, a * b)


def test_load_errors_are_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        OnnxModel("m", 1, tmp_path / "missing.onnx", ModelConfig())
    garbage = models.write_model(tmp_path, "garbage", b"not onnx")
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load it"):
        OnnxModel("garbage", 1, garbage, ModelConfig())


def test_warmup_from_config(tmp_path: Path) -> None:
    config = ModelConfig(warmup=(WarmupInput(name="x", shape=(2, 5), fill=1.5),), warmup_runs=2)
    model = _load(tmp_path, models.identity("FP32"), config)
    feeds = model.warmup_feeds()
    assert len(feeds) == 2
    np.testing.assert_array_equal(feeds[0]["x"], np.full((2, 5), 1.5, np.float32))
    model.warm_up()
    bad = ModelConfig(warmup=(WarmupInput(name="nope", shape=(1,)),))
    with pytest.raises(ModelLoadError, match="warmup input 'nope'"):
        _load(tmp_path, models.identity("FP32"), bad, name="other").warm_up()


def test_generated_warmup_covers_every_datatype(tmp_path: Path) -> None:
    for datatype in models.NUMPY_DATATYPES:
        _load(tmp_path, models.identity(datatype), name=datatype.lower()).warm_up()


def test_bf16_model_fails_to_load_cleanly(tmp_path: Path) -> None:
    # A ModelLoadError (not UnsupportedError) is what lets the manager mark the version UNAVAILABLE.
    with pytest.raises(ModelLoadError, match="BF16"):
        _load(tmp_path, models.identity("BF16")).warm_up()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this ONNX Runtime build has CUDA: there is nothing to fall back from")
def test_cpu_fallback_when_cuda_is_not_in_the_build(tmp_path: Path) -> None:
    config = ModelConfig(execution_providers=(ExecutionProvider(name="cuda"),), allow_cpu_fallback=True)
    assert _load(tmp_path, models.identity("FP32"), config).providers == ("CPUExecutionProvider",)


def test_missing_gpu_provider_without_fallback_fails_clearly(tmp_path: Path) -> None:
    config = ModelConfig(execution_providers=(ExecutionProvider(name="tensorrt"),))
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT is available here")
    with pytest.raises(ModelLoadError, match="tensorrt"):
        _load(tmp_path, models.identity("FP32"), config)


def expand_by_shape() -> onnx.ModelProto:
    """``x`` FP32 [3, 1] expanded to the shape given in ``shape`` (INT64 [2]): the generated
    warm-up (zeros) asks for shape [0, 0], which [3, 1] cannot broadcast to."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])], "expand_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "columns"])])
    return _model_of(graph)


def split_by_spec() -> onnx.ModelProto:
    """``x`` FP32 [6] split into two by ``split`` (INT64 [2]): zeros do not add up to 6."""
    graph = helper.make_graph(
        [helper.make_node("Split", ["x", "split"], ["a", "b"], axis=0)], "split_spec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
         helper.make_tensor_value_info("split", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["first"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["second"])])
    return _model_of(graph)


def _model_of(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, producer_name="sluice-tests",
                              opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    onnx.checker.check_model(model)
    return model


def test_generated_warmup_that_fails_does_not_fail_the_load(tmp_path: Path) -> None:
    model = _load(tmp_path, expand_by_shape())
    model.warm_up()  # logs a warning
    (y,) = model.run({"x": np.ones((3, 1), np.float32), "shape": np.array([3, 4], np.int64)})
    assert y.shape == (3, 4)
    configured = ModelConfig(warmup=(WarmupInput(name="x", shape=(3, 1)), WarmupInput(name="shape", shape=(2,))))
    with pytest.raises(ModelLoadError, match=r"m2/1/model\.onnx: warm-up failed"):
        _load(tmp_path, expand_by_shape(), configured, name="m2").warm_up()


@pytest.mark.timeout(120)
def test_models_the_generated_warmup_cannot_feed_are_served(tmp_path: Path,
                                                             start_service: Callable[..., ServiceHandle]) -> None:
    repo = tmp_path / "repo"
    models.write_model(repo, "expand", expand_by_shape())
    models.write_model(repo, "split", split_by_spec())
    # A warm-up the user configured is a promise about the model: when it fails, the load fails.
    models.write_model(repo, "configured", expand_by_shape(), config={
        "warmup": [{"name": "x", "shape": [3, 1]}, {"name": "shape", "shape": [2]}]})
    service = start_service(repo)
    with triton_grpc.InferenceServerClient(service.address) as triton:
        assert triton.is_model_ready("expand") and triton.is_model_ready("split")
        x, shape = triton_grpc.InferInput("x", [3, 1], "FP32"), triton_grpc.InferInput("shape", [2], "INT64")
        x.set_data_from_numpy(np.arange(3, dtype=np.float32).reshape(3, 1))
        shape.set_data_from_numpy(np.array([3, 4], np.int64))
        y = triton.infer("expand", [x, shape]).as_numpy("y")
        np.testing.assert_array_equal(y, np.repeat(np.arange(3, dtype=np.float32).reshape(3, 1), 4, axis=1))
        x, split = triton_grpc.InferInput("x", [6], "FP32"), triton_grpc.InferInput("split", [2], "INT64")
        x.set_data_from_numpy(np.arange(6, dtype=np.float32))
        split.set_data_from_numpy(np.array([2, 4], np.int64))
        result = triton.infer("split", [x, split])
        np.testing.assert_array_equal(result.as_numpy("b"), np.arange(2, 6, dtype=np.float32))
        assert not triton.is_model_ready("configured")
        rows = triton.get_model_repository_index(as_json=True)["models"]
        reason = next(r.get("reason", "") for r in rows if r["name"] == "configured")
        assert "configured/1/model.onnx: warm-up failed" in reason, rows
    assert "generated_warmup_failed" in service.process.log_text()


def _signature(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Any:
    return SimpleNamespace(inputs=tuple(inputs), outputs=tuple(outputs))


def test_signature_conflicts_name_every_break_for_inputs_and_outputs() -> None:
    old = _signature([TensorSpec("x", "FP32", (-1, 4)), TensorSpec("gone", "FP32", (1,)),
                      TensorSpec("typed", "FP32", (1,))],
                     [TensorSpec("y", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1,)),
                      TensorSpec("dropped", "FP32", (1,))])
    new = _signature([TensorSpec("x", "FP32", (-1, 5)), TensorSpec("typed", "FP64", (1,)),
                      TensorSpec("extra", "FP32", (1,))],
                     [TensorSpec("y", "FP32", (-1, 7)), TensorSpec("label", "INT32", (-1,))])
    assert signature_conflicts(old, new) == [
        "input 'x' changed shape [-1, 4] -> [-1, 5]",
        "input 'gone' was removed",
        "input 'typed' changed datatype FP32 -> FP64",
        "new required input 'extra'",
        # An output's shape may change (clients read what comes back); its datatype may not.
        "output 'label' changed datatype INT64 -> INT32",
        "output 'dropped' was removed",
    ]
    assert signature_conflicts(old, old) == []
