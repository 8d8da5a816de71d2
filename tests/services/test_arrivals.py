"""Counting accepted, not yet queued requests, and leaders waiting for them (bounded)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.arrivals import Arrivals
from tests.fixtures.service import ServiceHandle
from tests.services.clients import RPC_TIMEOUT_S


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
