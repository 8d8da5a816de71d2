"""Small ONNX models for the service tests, built with ``onnx.helper`` (nothing downloaded).

Each builder returns an ``onnx.ModelProto``; :func:`write_model` puts it into a repository as
``<repo>/<name>/<version>/model.onnx`` with an optional ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET: Final = 17
IR_VERSION: Final = 8

# KServe datatype -> ONNX element type (BF16 included: ONNX Runtime loads it, numpy cannot hold it).
ONNX_TYPE: Final[dict[str, int]] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
    "BF16": TensorProto.BFLOAT16,
}
NUMPY_DATATYPES: Final = tuple(d for d in ONNX_TYPE if d != "BF16")

Dims = list[int | str]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto] | None = None,
           check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "sluice_test", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, producer_name="sluice-tests",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    if check:
        onnx.checker.check_model(model)
    return model


def _value(name: str, datatype: str, dims: Dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ONNX_TYPE[datatype], dims)


def identity(datatype: str, dims: Dims | None = None) -> onnx.ModelProto:
    """``x`` -> ``y`` unchanged; by default both ``[batch, width]`` (dynamic, so batchable)."""
    dims = dims if dims is not None else ["batch", "width"]
    return _model([helper.make_node("Identity", ["x"], ["y"])],
                  [_value("x", datatype, dims)], [_value("y", datatype, dims)])


def cast(source: str, target: str) -> onnx.ModelProto:
    """``x`` of ``source`` -> ``y`` of ``target`` with the ONNX Cast op, ``[batch, width]``."""
    dims: Dims = ["batch", "width"]
    return _model([helper.make_node("Cast", ["x"], ["y"], to=ONNX_TYPE[target])],
                  [_value("x", source, dims)], [_value("y", target, dims)])


def fixed_first_dim() -> onnx.ModelProto:
    """``x`` FP32 [2, 3] -> ``y`` = 2x: the first dimension is fixed, so no batching."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    return _model([helper.make_node("Mul", ["x", "two"], ["y"])],
                  [_value("x", "FP32", [2, 3])], [_value("y", "FP32", [2, 3])], [two])


def column_sum() -> onnx.ModelProto:
    """``x`` FP32 [batch, 3] -> ``y`` FP32 [1, 3] (sum over rows): the output drops the batch dim."""
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    return _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
                  [_value("x", "FP32", ["batch", 3])], [_value("y", "FP32", [1, 3])], [axes])


def arithmetic() -> onnx.ModelProto:
    """Two inputs ``a``, ``b`` FP32 [batch, 3] -> ``sum``, ``difference``, ``product``."""
    dims: Dims = ["batch", 3]
    return _model(
        [helper.make_node("Add", ["a", "b"], ["sum"]),
         helper.make_node("Sub", ["a", "b"], ["difference"]),
         helper.make_node("Mul", ["a", "b"], ["product"])],
        [_value("a", "FP32", dims), _value("b", "FP32", dims)],
        [_value(n, "FP32", dims) for n in ("sum", "difference", "product")],
    )


def slow(matmuls: int = 40, size: int = 768) -> onnx.ModelProto:
    """``x`` FP32 [batch, 1] -> ``y`` = x, after ``matmuls`` size x size MatMuls that depend on ``x``.

    The work does not scale with the rows and cannot be constant-folded (it starts from ``x``),
    so every ONNX Runtime call takes about the same, noticeable time.
    """
    eye = numpy_helper.from_array(np.eye(size, dtype=np.float32), "eye")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Add", ["eye", "s"], ["m0"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "eye"], [f"m{i + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"m{matmuls}"], ["t"], keepdims=0),
              helper.make_node("Mul", ["t", "zero"], ["t0"]),
              helper.make_node("Add", ["x", "t0"], ["y"])]
    return _model(nodes, [_value("x", "FP32", ["batch", 1])], [_value("y", "FP32", ["batch", 1])],
                  [eye, zero])


def stuck(iterations: int = 3000, size: int = 1024) -> onnx.ModelProto:
    """``x`` FP32 [batch, 1] -> ``y`` = x, after ``iterations`` size x size MatMuls in one ``Loop``.

    The same work as :func:`slow` with ``matmuls=iterations``, but in a graph of a few nodes: a
    session of it is made in milliseconds, where 3000 MatMul nodes take ONNX Runtime ~12 s to
    plan. One run takes minutes: what makes a request stuck.
    """
    eye = numpy_helper.from_array(np.eye(size, dtype=np.float32), "eye")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    trips = numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips")
    keep_going = numpy_helper.from_array(np.array(True), "keep_going")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["m_in", "eye"], ["m_out"])],  # "eye" from the outer graph
        "stuck_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("m_in", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("m_out", TensorProto.FLOAT, [size, size])],
    )
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Add", ["eye", "s"], ["m0"]),
             helper.make_node("Loop", ["trips", "keep_going", "m0"], ["m"], body=body),
             helper.make_node("ReduceSum", ["m"], ["t"], keepdims=0),
             helper.make_node("Mul", ["t", "zero"], ["t0"]),
             helper.make_node("Add", ["x", "t0"], ["y"])]
    return _model(nodes, [_value("x", "FP32", ["batch", 1])], [_value("y", "FP32", ["batch", 1])],
                  [eye, zero, trips, keep_going])


def write_model(repo: Path, name: str, model: onnx.ModelProto | bytes, version: int = 1,
                config: dict[str, Any] | None = None) -> Path:
    """Write ``repo/name/version/model.onnx`` (and ``config.yaml`` when given); returns the file."""
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    if config is not None:
        (repo / name / "config.yaml").write_text(yaml.safe_dump(config))
    return path


# -- rollout variants: x FP32 [batch, 1] -> y FP32 [batch, 1] -----------------------------------------
ROLLOUT_TABLE_SIZE: Final = 64
"""The failing variant answers inputs 0 .. ROLLOUT_TABLE_SIZE - 1 (integers) and fails above."""


def doubler() -> onnx.ModelProto:
    """y = 2x: the baseline of the rollout tests."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    return _model([helper.make_node("Mul", ["x", "two"], ["y"])],
                  [_value("x", "FP32", ["batch", 1])], [_value("y", "FP32", ["batch", 1])], [two])


def doubler_by_adding() -> onnx.ModelProto:
    """y = x + x: another graph with the same answers as :func:`doubler` (a good candidate)."""
    return _model([helper.make_node("Add", ["x", "x"], ["y"])],
                  [_value("x", "FP32", ["batch", 1])], [_value("y", "FP32", ["batch", 1])])


def doubler_off_by(offset: float) -> onnx.ModelProto:
    """y = 2x + offset: answers, but disagrees with :func:`doubler`."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    off = numpy_helper.from_array(np.array(offset, dtype=np.float32), "off")
    return _model([helper.make_node("Mul", ["x", "two"], ["d"]), helper.make_node("Add", ["d", "off"], ["y"])],
                  [_value("x", "FP32", ["batch", 1])], [_value("y", "FP32", ["batch", 1])], [two, off])


def doubler_failing_above_table() -> onnx.ModelProto:
    """y = table[int(x)] with table[i] = 2i: as :func:`doubler` for x in 0 .. ROLLOUT_TABLE_SIZE - 1,
    an ONNX Runtime error (index out of bounds) for larger x."""
    table = numpy_helper.from_array(2.0 * np.arange(ROLLOUT_TABLE_SIZE, dtype=np.float32), "table")
    return _model([helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
                   helper.make_node("Gather", ["table", "i"], ["y"], axis=0)],
                  [_value("x", "FP32", ["batch", 1])], [_value("y", "FP32", ["batch", 1])], [table])
