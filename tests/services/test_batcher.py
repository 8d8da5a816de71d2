"""Dynamic batching, queue limits and deadlines, seen from clients of the real service."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from services.arrivals import Arrivals
from services.batcher import Batcher
from services.config import DynamicBatching, ModelConfig
from services.errors import DeadlineExceededError, ModelNotReadyError
from services.model import OnnxModel
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import RPC_TIMEOUT_S, infer_input
from tests.services.conftest import start_handle

WAIT_S = 30.0


def _statistics(client: triton_grpc.InferenceServerClient, model: str) -> Any:
    (stats,) = client.get_inference_statistics(model).model_stats
    return stats


def _batch_histogram(service: ServiceHandle, model: str) -> dict[str, float]:
    """``sluice_batch_size`` samples of one model: bucket bounds, ``count`` and ``sum``."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(service.metrics_text()):
        if family.name != "sluice_batch_size":
            continue
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            key = s.labels["le"] if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[-1]
            samples[key] = s.value
    return samples


async def _infer_all(address: str, model: str, batches: list[npt.NDArray[Any]], datatype: str = "FP32"
                     ) -> list[Any]:
    async with triton_aio.InferenceServerClient(address) as aio_client:
        calls = [aio_client.infer(model, [infer_input("x", batch, datatype)], request_id=str(i),
                                  client_timeout=RPC_TIMEOUT_S)
                 for i, batch in enumerate(batches)]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT_S)


# -- batching on the shared service -------------------------------------------------------------

async def test_concurrent_requests_each_get_their_own_rows(zoo: ServiceHandle, zoo_repo: Path) -> None:
    session = ort.InferenceSession(str(zoo_repo / "mlp_batched" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal((int(rng.integers(1, 5)), 16)).astype(np.float32) for _ in range(64)]
    results = await _infer_all(zoo.address, "mlp_batched", batches)
    for index, (batch, result) in enumerate(zip(batches, results, strict=True)):
        assert not isinstance(result, BaseException), result
        assert result.get_response().id == str(index)
        np.testing.assert_array_equal(result.as_numpy("y"), session.run(None, {"x": batch})[0])
    with triton_grpc.InferenceServerClient(zoo.address) as client:
        stats = _statistics(client, "mlp_batched")
    rows = sum(len(b) for b in batches)
    assert stats.inference_stats.success.count == 64
    assert stats.inference_count == rows
    assert 1 <= stats.execution_count < 64, "no requests were merged"
    histogram = _batch_histogram(zoo, "mlp_batched")
    assert histogram["count"] == stats.execution_count
    assert histogram["sum"] == rows
    # Every execution of more rows than the largest single request proves requests were merged.
    assert histogram["4.0"] < histogram["count"]


async def test_different_inner_shapes_never_merge(zoo: ServiceHandle) -> None:
    rng = np.random.default_rng(9)
    narrow = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    wide = [rng.standard_normal((1, 5)).astype(np.float32) for _ in range(3)]
    batches = [narrow[0], wide[0], narrow[1], wide[1], narrow[2], wide[2]]
    results = await _infer_all(zoo.address, "windowed", batches)
    for batch, result in zip(batches, results, strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), batch)
    with triton_grpc.InferenceServerClient(zoo.address) as client:
        stats = _statistics(client, "windowed")
    # The batching window is long enough for each shape to become exactly one batch.
    assert stats.execution_count == 2
    assert sorted((b.batch_size, b.compute_infer.count) for b in stats.batch_stats) == [(3, 1), (6, 1)]


async def test_empty_request_does_not_break_the_batch_it_joins(zoo: ServiceHandle) -> None:
    # A 0-row request once counted as 1 row, misaligning the batch and failing its neighbours.
    good = np.arange(6, dtype=np.float32).reshape(2, 3)
    empty = np.zeros((0, 3), dtype=np.float32)
    results = await _infer_all(zoo.address, "windowed_rows", [good, empty, good + 1])
    for batch, result in ((good, results[0]), (good + 1, results[2])):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), batch)
    if not isinstance(results[1], InferenceServerException):
        assert results[1].as_numpy("y").shape == (0, 3)
    else:
        assert results[1].status() == "StatusCode.INVALID_ARGUMENT"


async def test_models_that_cannot_batch_still_serve_concurrently(zoo: ServiceHandle) -> None:
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((int(rng.integers(1, 6)), 3)).astype(np.float32) for _ in range(12)]
    results = await _infer_all(zoo.address, "column_sum", batches)
    session = ort.InferenceSession(models.column_sum().SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, result in zip(batches, results, strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), session.run(None, {"x": batch})[0])
    fixed = [np.full((2, 3), i, dtype=np.float32) for i in range(8)]
    for batch, result in zip(fixed, await _infer_all(zoo.address, "fixed", fixed), strict=True):
        assert not isinstance(result, BaseException), result
        np.testing.assert_array_equal(result.as_numpy("y"), batch * 2)


# -- queue limit and deadlines on a slow model --------------------------------------------------

@pytest.fixture(scope="module")
def slow_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    repo = tmp_path_factory.mktemp("slow") / "repo"
    models.write_model(repo, "slow_q1", models.slow(), config={
        "max_batch_size": 0, "dynamic_batching": {"max_queue_size": 1}, "warmup_runs": 0})
    models.write_model(repo, "slow", models.slow(), config={"warmup_runs": 0})
    with start_handle(repo, repo.parent) as handle:
        yield handle


ONE = np.ones((1, 1), dtype=np.float32)


async def test_flood_beyond_the_queue_gets_resource_exhausted(slow_service: ServiceHandle) -> None:
    results = await _infer_all(slow_service.address, "slow_q1", [ONE * i for i in range(8)])
    refused = [r for r in results if isinstance(r, BaseException)]
    served = [(i, r) for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert refused and served, results
    for error in refused:
        assert isinstance(error, InferenceServerException), error
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED", error
        assert "queue is full" in error.message() and "slow_q1" in error.message()
    for index, result in served:
        np.testing.assert_array_equal(result.as_numpy("y"), ONE * index)
    with triton_grpc.InferenceServerClient(slow_service.address) as client:
        assert client.is_server_ready()
        assert _statistics(client, "slow_q1").inference_stats.fail.count == len(refused)
    assert slow_service.process.alive()


async def test_tiny_deadline_behind_slow_work_is_exceeded_and_not_run(slow_service: ServiceHandle) -> None:
    with triton_grpc.InferenceServerClient(slow_service.address) as client:
        before = _statistics(client, "slow").execution_count
        client.infer("slow", [infer_input("x", ONE, "FP32")], client_timeout=RPC_TIMEOUT_S)  # warm
    async with triton_aio.InferenceServerClient(slow_service.address) as aio_client:
        assert await aio_client.is_server_ready()  # the channel is up before the race starts
        busy = asyncio.create_task(aio_client.infer("slow", [infer_input("x", ONE, "FP32")],
                                                    client_timeout=RPC_TIMEOUT_S))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            await asyncio.wait_for(aio_client.infer("slow", [infer_input("x", ONE * 2, "FP32")],
                                                    client_timeout=0.1), WAIT_S)
        assert time.monotonic() - started < 5
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        first = await asyncio.wait_for(busy, WAIT_S)
        np.testing.assert_array_equal(first.as_numpy("y"), ONE)
        after = await aio_client.infer("slow", [infer_input("x", ONE * 3, "FP32")], client_timeout=RPC_TIMEOUT_S)
        np.testing.assert_array_equal(after.as_numpy("y"), ONE * 3)
    with triton_grpc.InferenceServerClient(slow_service.address) as client:
        assert client.is_server_ready()
        # The expired request was dropped from the queue, not run.
        assert _statistics(client, "slow").execution_count - before == 2 + 1
    assert slow_service.process.alive()


# -- the Batcher as a unit ----------------------------------------------------------------------

@pytest.fixture
def identity_model(tmp_path: Path) -> OnnxModel:
    path = models.write_model(tmp_path, "unit", models.identity("INT64"))
    config = ModelConfig(max_batch_size=4, dynamic_batching=DynamicBatching(max_queue_delay_us=50_000))
    return OnnxModel("unit", 1, path, config)


def _submit_all(batcher: Batcher, feeds: list[np.ndarray]) -> list[object]:
    """Submit every feed from its own thread (as gRPC handler threads do); results in order."""
    with ThreadPoolExecutor(max_workers=len(feeds)) as pool:
        futures = [pool.submit(batcher.submit, {"x": f}, len(f), (), None) for f in feeds]
        return [f.result(timeout=WAIT_S) for f in futures]


def test_batcher_splits_rows_and_respects_max_batch_size(identity_model: OnnxModel) -> None:
    executions: list[int] = []
    batcher = Batcher(identity_model, lambda _batch, rows, _started, _done: executions.append(rows))
    feeds = [np.full((rows, 2), i, dtype=np.int64) for i, rows in enumerate([1, 2, 1, 3, 1])]
    results = _submit_all(batcher, feeds)
    for feed, result in zip(feeds, results, strict=True):
        np.testing.assert_array_equal(result.outputs[0], feed)  # type: ignore[attr-defined]
    assert sum(executions) == 8
    assert max(executions) <= 4
    assert len(executions) < len(feeds)  # the 50 ms window merged some of them
    assert batcher.drain(5)


def test_batcher_under_many_threads_gives_each_caller_its_rows(tmp_path: Path) -> None:
    """Leader/follower hand-offs under contention: 64 threads, random row counts, 2 slots."""
    path = models.write_model(tmp_path, "many", models.identity("INT64"))
    model = OnnxModel("many", 1, path, ModelConfig(max_batch_size=16, instances=2))
    executions: list[int] = []
    batcher = Batcher(model, lambda _batch, rows, _started, _done: executions.append(rows))
    rng = np.random.default_rng(3)
    feeds = [rng.integers(0, 1 << 40, size=(int(rng.integers(1, 5)), 2)) for _ in range(64)]
    for _ in range(3):
        for feed, result in zip(feeds, _submit_all(batcher, feeds), strict=True):
            np.testing.assert_array_equal(result.outputs[0], feed)  # type: ignore[attr-defined]
    assert sum(executions) == 3 * sum(len(f) for f in feeds)
    assert batcher.drain(5)


def test_a_failing_accounting_callback_loses_no_request(identity_model: OnnxModel) -> None:
    """Statistics are recorded by the batch leader before it answers: if that fails, every caller
    still gets its rows (a follower left waiting would hang its RPC)."""
    def broken(*_args: object) -> None:
        raise RuntimeError("accounting is broken")

    batcher = Batcher(identity_model, broken)
    feeds = [np.full((1, 2), i, dtype=np.int64) for i in range(6)]
    for feed, result in zip(feeds, _submit_all(batcher, feeds), strict=True):
        np.testing.assert_array_equal(result.outputs[0], feed)  # type: ignore[attr-defined]
    assert batcher.drain(5)


def test_batcher_drain_finishes_queued_work_then_refuses(identity_model: OnnxModel) -> None:
    batcher = Batcher(identity_model)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(batcher.submit, {"x": np.ones((1, 2), np.int64)}, 1, (), None)
        time.sleep(0.01)  # queued, held open by the 50 ms window
        assert batcher.drain(5)
        np.testing.assert_array_equal(pending.result(timeout=WAIT_S).outputs[0], np.ones((1, 2), np.int64))
    with pytest.raises(ModelNotReadyError, match="unloading"):
        batcher.submit({"x": np.ones((1, 2), np.int64)}, 1, (), None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arrival_wait_us", [1_000_000, 0])
def test_leader_waits_for_an_arriving_request_only_when_asked(tmp_path: Path, arrival_wait_us: int) -> None:
    """A request still being decoded elsewhere (counted in Arrivals) joins the leader's batch when
    the leader may wait for it; with ``arrival_wait_us: 0`` the leader runs alone at once."""
    path = models.write_model(tmp_path, "arrive", models.identity("INT64"))
    config = ModelConfig(max_batch_size=8, dynamic_batching=DynamicBatching(arrival_wait_us=arrival_wait_us))
    arrivals = Arrivals()
    executions: list[int] = []
    batcher = Batcher(OnnxModel("arrive", 1, path, config),
                      lambda _batch, rows, _started, _done: executions.append(rows), arrivals)
    first, second = np.ones((1, 2), np.int64), np.full((2, 2), 7, np.int64)

    def late_request() -> object:
        arrivals.begin()  # this thread's request was accepted before the leader looked
        time.sleep(0.3)  # ...and takes a while to decode
        return batcher.submit({"x": second}, 2, (), None)

    with ThreadPoolExecutor(max_workers=2) as pool:
        arrivals.enter()
        late = pool.submit(late_request)
        started = time.monotonic()
        result = batcher.submit({"x": first}, 1, (), None)
        led_for = time.monotonic() - started
        late_result = late.result(timeout=WAIT_S)
    np.testing.assert_array_equal(result.outputs[0], first)
    np.testing.assert_array_equal(late_result.outputs[0], second)  # type: ignore[attr-defined]
    assert arrivals.pending == 0
    if arrival_wait_us:
        assert executions == [3] and led_for >= 0.25
    else:
        assert executions == [1, 2] and led_for < 0.25


class _GatedModel(OnnxModel):
    """The real model, whose first call waits for a gate: requests can arrive while it runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running = threading.Event()
        self.gate = threading.Event()

    def run(self, feeds: dict[str, npt.NDArray[Any]], outputs: Sequence[str] = ()) -> list[npt.NDArray[Any]]:
        if not self.gate.is_set():
            self.running.set()
            assert self.gate.wait(WAIT_S)
        return super().run(feeds, outputs)


@pytest.mark.timeout(60)
def test_a_lone_request_runs_without_queueing_and_hands_its_slot_on(tmp_path: Path) -> None:
    """Nothing queued, nothing arriving, no delay asked for: the request runs at once (it is never
    queued). Requests that arrive meanwhile queue behind it and get the slot when it is done."""
    path = models.write_model(tmp_path, "lone", models.identity("INT64"))
    model = _GatedModel("lone", 1, path, ModelConfig(max_batch_size=8))
    executions: list[int] = []
    batcher = Batcher(model, lambda _batch, rows, _started, _done: executions.append(rows), Arrivals())
    feeds = [np.full((1, 2), i, dtype=np.int64) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(batcher.submit, {"x": feeds[0]}, 1, (), None)
        assert model.running.wait(WAIT_S)
        assert batcher.queued == 0 and batcher.inflight == 1
        rest = [pool.submit(batcher.submit, {"x": f}, 1, (), None) for f in feeds[1:]]
        deadline = time.monotonic() + WAIT_S
        while batcher.queued < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert batcher.queued == 3 and batcher.inflight == 4
        model.gate.set()
        results = [first.result(timeout=WAIT_S), *(f.result(timeout=WAIT_S) for f in rest)]
    for feed, result in zip(feeds, results, strict=True):
        np.testing.assert_array_equal(result.outputs[0], feed)
    assert executions == [1, 3]  # the three that waited ran as one batch
    assert batcher.inflight == 0
    assert batcher.drain(5)


def test_a_lone_request_past_its_deadline_is_not_run(identity_model: OnnxModel) -> None:
    executions: list[int] = []
    batcher = Batcher(OnnxModel("unit", 1, identity_model.path, ModelConfig(max_batch_size=4)),
                      lambda _batch, rows, _started, _done: executions.append(rows))
    with pytest.raises(DeadlineExceededError, match="was not run"):
        batcher.submit({"x": np.ones((1, 2), np.int64)}, 1, (), time.monotonic() - 1)
    assert executions == []
    assert batcher.submit({"x": np.ones((1, 2), np.int64)}, 1, (), None).batch_rows == 1
    assert executions == [1] and batcher.inflight == 0
