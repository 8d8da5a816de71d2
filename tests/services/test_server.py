"""The service process: health and reflection, start-up with bad repository content, shutdown."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.fixtures.processes import port_open, wait_for
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import RPC_TIMEOUT_S, infer_input

GRACE_S = 10.0


def _health(service: ServiceHandle, name: str) -> int:
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT_S).status)


def test_health_service_overall_and_per_model(zoo: ServiceHandle) -> None:
    assert _health(zoo, "") == health_pb2.HealthCheckResponse.SERVING
    assert _health(zoo, "iris") == health_pb2.HealthCheckResponse.SERVING
    assert _health(zoo, "broken") == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as caught:
        _health(zoo, "nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_reflection_lists_the_services(zoo: ServiceHandle) -> None:
    with grpc.insecure_channel(zoo.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT_S))
    services = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_metrics_endpoint_serves_prometheus_text(zoo: ServiceHandle) -> None:
    with triton_grpc.InferenceServerClient(zoo.address) as client:
        client.infer("identity_int32", [infer_input("x", np.ones((1, 1), np.int32), "INT32")],
                     client_timeout=RPC_TIMEOUT_S)
    text = zoo.metrics_text()
    assert 'sluice_requests_total{code="OK",model="identity_int32",version="1"}' in text
    assert 'sluice_model_loads_total{model="broken",outcome="failed"} 1.0' in text
    assert 'sluice_loaded_versions{model="iris"} 2.0' in text


# -- start-up with bad content in the repository ------------------------------------------------

def _start_and_wait(start_service: Callable[..., ServiceHandle], repo: Path) -> ServiceHandle:
    """Start without the fixture's wait, so a crash fails with the log instead of a timeout."""
    handle = start_service(repo, wait=False)
    handle.process.wait_until(handle.ready, 30, "ServerReady")
    return handle


def _good_model(repo: Path) -> None:
    models.write_model(repo, "good", models.identity("FP32"))


def _assert_good_model_serves(handle: ServiceHandle) -> None:
    with triton_grpc.InferenceServerClient(handle.address) as client:
        x = np.ones((2, 2), np.float32)
        result = client.infer("good", [infer_input("x", x, "FP32")], client_timeout=RPC_TIMEOUT_S)
        np.testing.assert_array_equal(result.as_numpy("y"), x)


def _index(handle: ServiceHandle) -> dict[tuple[str, str], Any]:
    with triton_grpc.InferenceServerClient(handle.address) as client:
        return {(m.name, m.version): m for m in client.get_model_repository_index().models}


@pytest.mark.slow
def test_bad_config_yaml_makes_only_that_model_unavailable(start_service: Callable[..., ServiceHandle],
                                                           tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _good_model(repo)
    models.write_model(repo, "misconfigured", models.identity("FP32"), config={"max_batch_size": -1, "bogus": 1})
    handle = _start_and_wait(start_service, repo)
    entry = _index(handle)[("misconfigured", "")]
    assert entry.state == "UNAVAILABLE"
    assert "bogus" in entry.reason and "max_batch_size" in entry.reason
    _assert_good_model_serves(handle)


@pytest.mark.slow
def test_bf16_model_is_unavailable_and_the_rest_serves(start_service: Callable[..., ServiceHandle],
                                                        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _good_model(repo)
    models.write_model(repo, "bf16", models.identity("BF16"))
    handle = _start_and_wait(start_service, repo)
    entry = _index(handle)[("bf16", "1")]
    assert entry.state == "UNAVAILABLE"
    assert "BF16" in entry.reason
    _assert_good_model_serves(handle)


@pytest.mark.slow
def test_odd_version_folder_is_ignored(start_service: Callable[..., ServiceHandle], tmp_path: Path) -> None:
    # '²'.isdigit() is true but int('²') fails: scanning must skip the folder, not crash the server.
    repo = tmp_path / "repo"
    _good_model(repo)
    (repo / "good" / "²").mkdir()
    handle = _start_and_wait(start_service, repo)
    assert ("good", "1") in _index(handle)
    _assert_good_model_serves(handle)


# -- graceful shutdown --------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_then_exits(start_service: Callable[..., ServiceHandle],
                                                        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    # No batching: the three requests run one after another, so two of them are still queued.
    models.write_model(repo, "slow", models.slow(), config={"max_batch_size": 0, "warmup_runs": 0})
    handle = start_service(repo, "--grace-period", str(GRACE_S))
    results: dict[int, Any] = {}

    def call(index: int) -> None:
        try:
            with triton_grpc.InferenceServerClient(handle.address) as client:
                x = np.full((1, 1), index, np.float32)
                results[index] = client.infer("slow", [infer_input("x", x, "FP32")], client_timeout=30)
        except Exception as exc:  # recorded and asserted on below
            results[index] = exc

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: 'sluice_inflight_requests{model="slow",version="1"} 3.0' in handle.metrics_text(),
             10, "three requests in flight")
    signalled = time.monotonic()
    handle.process.signal(signal.SIGTERM)
    wait_for(lambda: not port_open(handle.port), 5, "the gRPC port to stop accepting")
    with triton_grpc.InferenceServerClient(handle.address) as late, \
            pytest.raises(Exception, match=r"(?i)unavailable|connect"):
        late.infer("slow", [infer_input("x", np.ones((1, 1), np.float32), "FP32")], client_timeout=5)
    for thread in threads:
        thread.join(timeout=GRACE_S + 10)
    for index in range(3):
        result = results[index]
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 1), index, np.float32))
    assert handle.process.proc.wait(timeout=GRACE_S + 5) == 0
    assert time.monotonic() - signalled < GRACE_S + 5
    assert "Traceback" not in handle.process.log_text()
