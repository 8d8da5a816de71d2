"""Counting accepted, not yet queued requests, and leaders waiting for them (bounded)."""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.arrivals import Arrivals, HandlerPool
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services.clients import RPC_TIMEOUT_S

INFER = "/inference.GRPCInferenceService/ModelInfer"


class _Event:
    """The two shapes of gRPC's call event that name a method."""

    def __init__(self, tag: Any = None, method: bytes = b"") -> None:
        self.tag = tag
        self.call_details = type("Details", (), {"method": method})()


def test_settle_returns_at_once_when_nothing_is_arriving() -> None:
    arrivals = Arrivals()
    started = time.monotonic()
    arrivals.settle(5.0, lambda: False)
    assert time.monotonic() - started < 1.0


@pytest.mark.timeout(30)
def test_settle_waits_for_arriving_requests_then_returns_early() -> None:
    arrivals = Arrivals()
    arrivals.enter()

    def request() -> None:
        arrivals.begin()
        time.sleep(0.2)
        arrivals.arrived()
        arrivals.arrived()  # idempotent: the pool calls it again when the handler returns

    thread = threading.Thread(target=request)
    started = time.monotonic()
    thread.start()
    arrivals.settle(10.0, lambda: False)
    waited = time.monotonic() - started
    thread.join(5)
    assert 0.15 < waited < 5.0
    assert arrivals.pending == 0


@pytest.mark.timeout(30)
def test_settle_is_bounded_and_stops_when_the_batch_is_full() -> None:
    arrivals = Arrivals()
    arrivals.enter()  # never arrives
    started = time.monotonic()
    arrivals.settle(0.2, lambda: False)
    assert 0.15 < time.monotonic() - started < 5.0

    full = threading.Event()

    def batch_fills() -> None:
        full.set()
        arrivals.wake()

    waker = threading.Timer(0.1, batch_fills)
    started = time.monotonic()
    waker.start()
    arrivals.settle(10.0, full.is_set)
    assert time.monotonic() - started < 5.0
    waker.join(5)


def _run(pool: HandlerPool, fn: Any, event: _Event) -> None:
    """Submit as gRPC does and wait until the work item is done."""
    finished = threading.Event()
    pool.submit(fn, event).add_done_callback(lambda _done: finished.set())
    assert finished.wait(10)


@pytest.mark.timeout(30)
def test_pool_counts_only_the_named_methods_and_never_leaks() -> None:
    arrivals = Arrivals()
    pool = HandlerPool(arrivals, frozenset({INFER}), max_workers=2)
    try:
        seen: list[int] = []
        # Registered methods carry their name as the event's tag; generic ones in call details.
        for event in (_Event(tag=INFER), _Event(method=INFER.encode())):
            _run(pool, lambda _e: seen.append(arrivals.pending), event)
        assert seen == [1, 1] and arrivals.pending == 0

        _run(pool, lambda _e: seen.append(arrivals.pending), _Event(tag="/grpc.health.v1.Health/Check"))
        assert seen[-1] == 0

        def fails(_event: Any) -> None:
            raise ValueError("handler failed before queueing")

        _run(pool, fails, _Event(tag=INFER))
        assert arrivals.pending == 0
        # gRPC adds its callback after submit returns: one added late still runs, at once.
        late: list[object] = []
        done = pool.submit(lambda _e: None, _Event(tag=INFER))
        deadline = time.monotonic() + 10
        while arrivals.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        done.add_done_callback(late.append)
        assert late == [done]
    finally:
        pool.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        pool.submit(lambda _e: None, _Event(tag=INFER))
    assert arrivals.pending == 0  # refused by a shut-down pool: not counted either


@pytest.mark.timeout(30)
def test_pool_runs_at_most_max_workers_at_once_and_queues_the_rest() -> None:
    pool = HandlerPool(Arrivals(), frozenset(), max_workers=3)
    lock = threading.Lock()
    running = [0, 0]  # now, most
    release = threading.Event()

    def work() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1

    finished = threading.Semaphore(0)
    try:
        for _ in range(10):
            pool.submit(work).add_done_callback(lambda _done: finished.release())
        time.sleep(0.3)
        assert running[1] == 3
        release.set()
        for _ in range(10):
            assert finished.acquire(timeout=10)
    finally:
        pool.shutdown(wait=True)


def _arriving(service: ServiceHandle) -> float:
    for family in text_string_to_metric_families(service.metrics_text()):
        if family.name == "sluice_arriving_requests":
            return float(family.samples[0].value)
    raise AssertionError("sluice_arriving_requests missing from /metrics")


@pytest.mark.timeout(120)
def test_the_service_counts_arrivals_back_to_zero_after_good_and_bad_requests(
        zoo: ServiceHandle, zoo_repo: Path) -> None:
    """A leak would make every batch leader wait its full arrival_wait_us from then on."""
    good = np.ones((1, 4), dtype=np.float32)
    requests = []
    for index in range(64):
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
        raw = good.tobytes() if index % 4 else b"\x00" * 3  # every fourth: wrong byte count
        name = "no-such-model" if index % 8 == 1 else "identity_fp32"
        requests.append(pb.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=[raw]))
    with grpc.insecure_channel(zoo.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(r, timeout=RPC_TIMEOUT_S) for r in requests]
        codes = []
        for future in futures:
            try:
                future.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        # A stream's requests run one after another on one handler thread, uncounted.
        streamed = list(stub.ModelStreamInfer(iter(requests[1:6]), timeout=RPC_TIMEOUT_S))
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.INVALID_ARGUMENT in codes
    assert grpc.StatusCode.NOT_FOUND in codes
    assert len(streamed) == 5 and any(not r.error_message for r in streamed)
    deadline = time.monotonic() + 10
    while _arriving(zoo) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _arriving(zoo) == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
@pytest.mark.timeout(30)
@pytest.mark.parametrize(("batch_policy", "expected"), [(True, "SCHED_BATCH"), (False, "SCHED_OTHER")])
def test_pool_threads_run_under_the_asked_policy(batch_policy: bool, expected: str) -> None:
    pool = HandlerPool(Arrivals(), frozenset(), max_workers=1, batch_policy=batch_policy)
    seen: list[int] = []
    try:
        _run(pool, lambda _e: seen.append(os.sched_getscheduler(0)), _Event())
    finally:
        pool.shutdown(wait=True)
    assert seen == [getattr(os, expected)]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread policies from /proc")
@pytest.mark.timeout(120)
def test_the_service_handler_threads_run_under_sched_batch(zoo: ServiceHandle) -> None:
    with grpc.insecure_channel(zoo.address) as channel:  # starts at least one handler thread
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S)
    policies: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{zoo.process.pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        policies[int(task.name)] = (name, int(stat[stat.rindex(")") + 2:].split()[38]))  # field 41: policy
    # Python 3.11 does not name OS threads: the handler threads are the ones under SCHED_BATCH.
    assert any(policy == os.SCHED_BATCH for _, policy in policies.values()), policies
    assert policies[zoo.process.pid][1] == os.SCHED_OTHER  # the main thread (asyncio loop) keeps the default


def test_an_idle_handler_thread_keeps_no_reference_to_its_last_call() -> None:
    """gRPC's call event holds the call, its request bytes and its HTTP/2 stream: a thread that
    kept its last one while idle kept the stream counted against the connection's
    max_concurrent_streams (concurrent clients were refused once enough threads each held one)."""

    class CallEvent:
        pass

    pool = HandlerPool(Arrivals(), frozenset(), max_workers=2)
    try:
        event = CallEvent()
        released = weakref.ref(event)
        ran = threading.Event()
        pool.submit(lambda _event: ran.set(), event)
        assert ran.wait(5.0)
        del event
        wait_for(lambda: released() is None, 5.0, "the handler thread to drop its last call event")
    finally:
        pool.shutdown()
