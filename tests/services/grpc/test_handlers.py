"""The gRPC handler pool: counting the inference RPCs it runs, its bound, its threads' policy."""

from __future__ import annotations

import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.arrivals import Arrivals
from services.grpc.handlers import HandlerPool
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services.clients import RPC_TIMEOUT_S

INFER = "/inference.GRPCInferenceService/ModelInfer"


class _Event:
    """The two shapes of gRPC's call event that name a method."""

    def __init__(self, tag: Any = None, method: bytes = b"") -> None:
        self.tag = tag
        self.call_details = type("Details", (), {"method": method})()


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
