"""Inference results through the real service equal what ONNX Runtime computes in this process.

The in-process session uses the service's default session options (one intra-op thread, all graph
optimisations), so the same kernels run on the same inputs: results are compared bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
from sklearn.datasets import load_iris

from services.catalog import ModelCatalog
from services.dataplane import DataPlane
from services.errors import ModelNotReadyError
from services.manager import ModelManager
from services.metrics import ServiceMetrics
from services.served import ServedVersion
from services.types import InferInput, InferRequest
from tests.services import models
from tests.services.clients import RPC_TIMEOUT_S, infer_input


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("version", ["1", "2"])
def test_iris_matches_onnx_runtime(client: triton_grpc.InferenceServerClient, zoo_repo: Path,
                                   version: str) -> None:
    session = _session(zoo_repo / "iris" / version / "model.onnx")
    data = load_iris().data.astype(np.float32)
    noise = np.random.default_rng(int(version)).normal(0, 2, (24, 4)).astype(np.float32)
    for chunk in [*np.array_split(data, 5), noise, data[:1]]:
        expected_label, expected_probabilities = session.run(None, {"input": chunk})
        result = client.infer("iris", [infer_input("input", chunk, "FP32")], model_version=version,
                              client_timeout=RPC_TIMEOUT_S)
        assert result.get_response().model_version == version
        np.testing.assert_array_equal(result.as_numpy("label"), expected_label)
        np.testing.assert_array_equal(result.as_numpy("probabilities"), expected_probabilities)


def test_mlp_matches_onnx_runtime(client: triton_grpc.InferenceServerClient, zoo_repo: Path) -> None:
    session = _session(zoo_repo / "mlp" / "1" / "model.onnx")
    rng = np.random.default_rng(11)
    for rows in (1, 2, 7, 32):
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        (expected,) = session.run(None, {"x": x})
        result = client.infer("mlp", [infer_input("x", x, "FP32")], client_timeout=RPC_TIMEOUT_S)
        assert result.as_numpy("y").dtype == np.float32
        np.testing.assert_array_equal(result.as_numpy("y"), expected)


def test_fixed_first_dimension_model_serves(client: triton_grpc.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    result = client.infer("fixed", [infer_input("x", x, "FP32")], client_timeout=RPC_TIMEOUT_S)
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)


async def test_a_request_routed_to_a_version_retired_before_it_queued_is_routed_again(tmp_path: Path) -> None:
    """Hot reload under load: a request resolves the newest version, the version is retired (its
    queue closes) before the request is queued. It must be served by what the catalog routes to
    now, not lost; with nothing else serving, it gets the catalog's own error."""
    repo = tmp_path / "repo"
    for version in (1, 2):
        models.write_model(repo, "m", models.identity("FP32"), version=version)
    catalog = ModelCatalog()
    manager = ModelManager(repo, catalog, ServiceMetrics())
    await manager.load_all()
    plane = DataPlane(catalog, manager)
    retired = catalog.retire("m", 2)
    assert retired is not None and retired.batcher.drain(5)
    resolve = catalog.resolve
    stale = [retired]

    def routed_before_the_retirement(name: str, version: int | None) -> ServedVersion:
        return stale.pop() if stale else resolve(name, version)

    catalog.resolve = routed_before_the_retirement  # type: ignore[method-assign]
    x = np.ones((1, 1), np.float32)
    response = plane.infer(InferRequest("m", None, [InferInput("x", "FP32", (1, 1), x)]))
    assert response.version == 1
    np.testing.assert_array_equal(response.outputs[0].data, x)
    # Pinned to the retired version, nothing else to go to: the error names the version.
    stale.append(retired)
    catalog.retire("m", 1)
    with pytest.raises(ModelNotReadyError, match="has no version ready to serve"):
        plane.infer(InferRequest("m", 2, [InferInput("x", "FP32", (1, 1), x)]))
    await manager.close()
