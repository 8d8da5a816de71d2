"""Build a small sluice model repository for the examples and the benchmarks.

Layout written (one ``config.yaml`` per model, one ``model.onnx`` per version)::

    OUT/iris/1/model.onnx    LogisticRegression on scikit-learn's bundled iris data
    OUT/iris/2/model.onnx    GradientBoostingClassifier on the same data
    OUT/iris/config.yaml
    OUT/mlp/1/model.onnx     tiny MLP, x FP32 [-1, 16] -> y FP32 [-1, 4]
    OUT/mlp/config.yaml
    OUT/heavy/1/model.onnx   8 x (512x512 MatMul + Relu), x FP32 [-1, 512] -> y FP32 [-1, 512]
    OUT/heavy/config.yaml

Everything is deterministic (fixed ``random_state`` / seeded numpy RNGs) and nothing is downloaded.

Usage::

    python examples/build_models.py --out /tmp/models [--force]

or from Python::

    from examples.build_models import build_all
    paths = build_all(Path("/tmp/models"))
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

# ONNX opset for every model. onnxruntime 1.31 supports far newer opsets; 17 is old enough that any
# onnxruntime >= 1.14 (and skl2onnx's converters) handle it, so the repository is portable.
TARGET_OPSET = 17
# skl2onnx also emits ops from the "ai.onnx.ml" domain (LinearClassifier, TreeEnsembleClassifier).
TARGET_ML_OPSET = 3
# ONNX IR version 8 matches opset 17 and is readable by every onnxruntime from 1.14 on.
IR_VERSION = 8

# config.yaml written next to each model's version folders. Keep to these keys.
CONFIG_TEMPLATE = """\
# sluice model config for '{name}' (written by examples/build_models.py).
# Largest batch the server may form from queued requests (first dimension of every input).
max_batch_size: {max_batch_size}
# Requests queue for at most max_queue_delay_us before a batch is run; 0 = run what is queued now.
dynamic_batching:
  max_queue_delay_us: 0
  max_queue_size: 1024
# Free-form labels, reported in model metadata.
labels:
  example: "true"
"""


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Check the model and write it to ``path`` (parents created)."""
    model.ir_version = min(model.ir_version, IR_VERSION)
    # skl2onnx collects opset imports in a set: sort them so the bytes do not depend on hash seeds.
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def _write_config(model_dir: Path, name: str, max_batch_size: int = 32) -> Path:
    path = model_dir / "config.yaml"
    path.write_text(CONFIG_TEMPLATE.format(name=name, max_batch_size=max_batch_size))
    return path


def _iris_onnx(classifier: object, name: str) -> onnx.ModelProto:
    """Train ``classifier`` on iris; export input FP32 [-1,4] -> label INT64 [-1], probabilities [-1,3]."""
    data = load_iris()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    classifier.fit(x, y)  # type: ignore[attr-defined]
    model = to_onnx(
        classifier,
        initial_types=[("input", FloatTensorType([None, 4]))],
        # ZipMap would turn probabilities into a sequence of maps; a plain tensor is what we serve.
        options={id(classifier): {"zipmap": False}},
        target_opset={"": TARGET_OPSET, "ai.onnx.ml": TARGET_ML_OPSET},
        final_types=None,
    )
    # skl2onnx names the outputs "label" and "probabilities" already; make sure, and name the graph.
    outputs = [o.name for o in model.graph.output]
    if outputs != ["label", "probabilities"]:
        raise RuntimeError(f"unexpected iris outputs {outputs}")
    model.graph.name = name
    return model


def build_iris(out: Path) -> list[Path]:
    """iris/1 = LogisticRegression, iris/2 = GradientBoostingClassifier."""
    model_dir = out / "iris"
    v1 = _iris_onnx(LogisticRegression(max_iter=500, random_state=0), "iris_logreg")
    v2 = _iris_onnx(GradientBoostingClassifier(n_estimators=50, max_depth=2, random_state=0), "iris_gbc")
    return [
        _save(v1, model_dir / "1" / "model.onnx"),
        _save(v2, model_dir / "2" / "model.onnx"),
        _write_config(model_dir, "iris"),
    ]


def _dense_graph(
    name: str,
    in_features: int,
    layers: list[tuple[np.ndarray, np.ndarray | None, bool]],
) -> onnx.ModelProto:
    """Chain of MatMul(+Add)(+Relu) layers: input ``x`` FP32 [-1, in] -> output ``y`` FP32 [-1, out]."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = "x"
    for i, (weight, bias, relu) in enumerate(layers):
        w_name = f"w{i}"
        inits.append(numpy_helper.from_array(weight.astype(np.float32), w_name))
        nxt = f"mm{i}"
        nodes.append(helper.make_node("MatMul", [cur, w_name], [nxt], name=f"MatMul_{i}"))
        cur = nxt
        if bias is not None:
            b_name = f"b{i}"
            inits.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
            nxt = f"add{i}"
            nodes.append(helper.make_node("Add", [cur, b_name], [nxt], name=f"Add_{i}"))
            cur = nxt
        if relu:
            nxt = f"relu{i}"
            nodes.append(helper.make_node("Relu", [cur], [nxt], name=f"Relu_{i}"))
            cur = nxt
    # Rename the last tensor to "y" so the output has a stable name.
    nodes[-1].output[0] = "y"
    out_features = layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, in_features])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, out_features])],
        initializer=inits,
    )
    # make_tensor_value_info writes -1 as a fixed dim; use a symbolic "batch" dim instead.
    for value in (*graph.input, *graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = "batch"
    return helper.make_model(
        graph,
        producer_name="sluice-examples",
        opset_imports=[helper.make_opsetid("", TARGET_OPSET)],
    )


def build_mlp(out: Path) -> list[Path]:
    """mlp/1: x [-1,16] -> MatMul+Add+Relu (32) -> MatMul+Add (4) -> y [-1,4]."""
    rng = np.random.default_rng(1234)
    layers = [
        (rng.standard_normal((16, 32)) * 0.25, rng.standard_normal(32) * 0.1, True),
        (rng.standard_normal((32, 4)) * 0.25, rng.standard_normal(4) * 0.1, False),
    ]
    model_dir = out / "mlp"
    return [
        _save(_dense_graph("mlp", 16, layers), model_dir / "1" / "model.onnx"),
        _write_config(model_dir, "mlp"),
    ]


def build_heavy(out: Path) -> list[Path]:
    """heavy/1: 8 x (512x512 MatMul + Relu), x [-1,512] -> y [-1,512]; ~8 MiB of weights."""
    rng = np.random.default_rng(5678)
    width = 512
    # He-style scaling (sqrt(2/fan_in)) keeps activations O(1) through ReLU layers: finite and non-zero.
    scale = np.sqrt(2.0 / width)
    layers: list[tuple[np.ndarray, np.ndarray | None, bool]] = [
        (rng.standard_normal((width, width)) * scale, None, True) for _ in range(8)
    ]
    model_dir = out / "heavy"
    return [
        _save(_dense_graph("heavy", width, layers), model_dir / "1" / "model.onnx"),
        _write_config(model_dir, "heavy"),
    ]


BUILDERS: dict[str, Callable[[Path], list[Path]]] = {
    "iris": build_iris,
    "mlp": build_mlp,
    "heavy": build_heavy,
}


def build_all(out: Path, *, force: bool = False, verbose: bool = False) -> list[Path]:
    """Write every example model under ``out``; return the paths written.

    A model whose folder already exists is rebuilt only with ``force=True`` (otherwise it is kept and
    its existing files are returned), so repeated calls are cheap.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, builder in BUILDERS.items():
        model_dir = out / name
        if model_dir.exists() and not force:
            existing = sorted(p for p in model_dir.rglob("*") if p.is_file())
            if existing:
                if verbose:
                    print(f"[build] {name:<6} exists, kept ({len(existing)} files; --force rebuilds)")
                written.extend(existing)
                continue
        if model_dir.exists():
            shutil.rmtree(model_dir)
        paths = builder(out)
        if verbose:
            versions = sorted(p.parent.name for p in paths if p.name == "model.onnx")
            print(f"[build] {name:<6} versions {','.join(versions)} -> {model_dir}")
        written.extend(paths)
    return written


def _describe(path: Path) -> str:
    """One-line signature of a model file: inputs -> outputs with dtype and shape."""
    model = onnx.load(str(path), load_external_data=False)

    def sig(values: object) -> str:
        parts = []
        for v in values:  # type: ignore[attr-defined]
            tt = v.type.tensor_type
            dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tt.shape.dim]
            dtype = TensorProto.DataType.Name(tt.elem_type)
            parts.append(f"{v.name} {dtype} [{','.join(dims)}]")
        return ", ".join(parts)

    return f"{sig(model.graph.input)} -> {sig(model.graph.output)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model repository folder to write")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)

    paths = build_all(args.out, force=args.force, verbose=True)
    root = args.out.resolve()
    rows = []
    for p in paths:
        rel = p.resolve().relative_to(root)
        detail = _describe(p) if p.suffix == ".onnx" else "config"
        rows.append((str(rel), f"{p.stat().st_size:,}", detail))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\nwrote {len(rows)} files under {root}:")
    print(f"  {'path':<{w0}}  {'bytes':>{w1}}  signature")
    for rel, size, detail in rows:
        print(f"  {rel:<{w0}}  {size:>{w1}}  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
