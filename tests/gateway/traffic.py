"""Send inference requests through the gateway and count which version answered; clients that
call all along while a test renews certificates (:class:`CallsAllAlong`)."""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.processes import wait_for

RPC_TIMEOUT_S = 10.0
Metadata = Sequence[tuple[str, str]]


def iris_request() -> pb.ModelInferRequest:
    data = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(data.tobytes())
    return request


async def infer(stub: pb_grpc.GRPCInferenceServiceStub, metadata: Metadata) -> pb.ModelInferResponse:
    response: pb.ModelInferResponse = await stub.ModelInfer(iris_request(), metadata=tuple(metadata),
                                                            timeout=RPC_TIMEOUT_S)
    return response


async def count_versions(address: str, total: int, metadata: Metadata | Callable[[int], Metadata] = (),
                         concurrency: int = 16) -> collections.Counter[str]:
    """Send ``total`` requests (``concurrency`` at a time); version → how many it answered."""
    counts: collections.Counter[str] = collections.Counter()
    next_index = iter(range(total))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            for index in next_index:
                md = metadata(index) if callable(metadata) else metadata
                response = await infer(stub, md)
                counts[response.model_version] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


async def grpc_error(address: str, metadata: Metadata) -> grpc.aio.AioRpcError:
    """The error one request gets (fails the test if it succeeds)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            await infer(stub, metadata)
        except grpc.aio.AioRpcError as exc:
            return exc
    pytest.fail(f"request with {metadata} succeeded, an error was expected")


def assert_binomial(count: int, total: int, share: float, sigmas: float = 4.0) -> None:
    """``count`` of ``total`` is within ``sigmas`` binomial standard deviations of ``share``."""
    expected = total * share
    sd = math.sqrt(total * share * (1 - share))
    assert abs(count - expected) <= sigmas * sd, (
        f"{count}/{total} answered, expected {expected:.0f} ± {sigmas * sd:.0f} ({sigmas} sd)")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.05) -> float:
    """Await ``check`` until true; seconds it took. Fails the test naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


class CallsAllAlong:
    """Clients calling in threads of their own while the ``with`` block runs: answers counted per
    client (``ok``), every failure kept (``failures``); on exit they stop and are joined.

    A client is a function ``(calls, slot)`` that loops while :meth:`running`, telling
    :meth:`answered` (its slot) or :meth:`failed` (why) after each call (:func:`grpc_caller`).
    """

    def __init__(self, *clients: Callable[[CallsAllAlong, int], None]) -> None:
        self.ok = [0] * len(clients)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=client, args=(self, slot), name=f"caller-{slot}")
                         for slot, client in enumerate(clients)]

    def running(self) -> bool:
        return not self._stop.is_set()

    def answered(self, slot: int) -> None:
        self.ok[slot] += 1

    def failed(self, why: str) -> None:
        self.failures.append(why)

    def wait_all_answered(self, timeout: float, what: str) -> None:
        """Until every client has had one more answer than when this was called."""
        before = list(self.ok)
        wait_for(lambda: all(now > then for now, then in zip(self.ok, before, strict=True)), timeout, what)

    def __enter__(self) -> CallsAllAlong:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def grpc_caller(channel: Callable[[], grpc.Channel], request: Callable[[], pb.ModelInferRequest],
                label: str = "grpc") -> Callable[[CallsAllAlong, int], None]:
    """A client of :class:`CallsAllAlong` calling ModelInfer over one long-lived HTTP/2 connection
    (``channel()`` opens it); a failure is kept as ``<label>: <code> <details>``."""
    def call(calls: CallsAllAlong, slot: int) -> None:
        with channel() as opened:
            stub = pb_grpc.GRPCInferenceServiceStub(opened)
            while calls.running():
                try:
                    stub.ModelInfer(request(), timeout=RPC_TIMEOUT_S)
                    calls.answered(slot)
                except grpc.RpcError as exc:
                    calls.failed(f"{label}: {exc.code()} {exc.details()}")

    return call
