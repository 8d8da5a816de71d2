"""Hostile and careless requests against the real service: each kind of bench/fuzz.py's corpus gets
its own status code and message (never INTERNAL), the service keeps serving, and a few thousand
frames that do not parse leave its memory flat."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from bench.fuzz import (
    GOOD,
    KINDS,
    Case,
    answered_as_expected,
    build_repo,
    every_case,
    request,
    rss_mb,
    send,
)
from tests.fixtures.service import ServiceHandle
from tests.services.clients import RPC_TIMEOUT_S, assert_no_traceback, check_still_serving

CASES = list(every_case())
assert {case.kind for case in CASES} == set(KINDS)  # every kind of the fuzz corpus is covered here

MIB = 1024 * 1024


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kind}-{i}" for i, c in enumerate(CASES)])
def test_malformed_request_gets_its_code_and_message(zoo: ServiceHandle, case: Case) -> None:
    with grpc.insecure_channel(zoo.address, options=[("grpc.max_send_message_length", 64 * MIB)]) as channel:
        outcome = send(channel, case, timeout=RPC_TIMEOUT_S)
    assert outcome.code != grpc.StatusCode.INTERNAL, outcome.details
    assert answered_as_expected(case, outcome), (
        f"expected {case.code.name} with {case.fragment!r}, got {outcome.code.name} {outcome.details[:300]!r} "
        f"{outcome.stream_errors!r} ({outcome.stream_answers} stream answers)")
    for text in (outcome.details, *outcome.stream_errors):
        assert_no_traceback(text)
        # Client strings are clipped: a 1 MiB name never comes back whole (the client could not
        # even read such a status: its metadata would be over gRPC's limit).
        assert len(text) < 4096, text[:300]
    check_still_serving(zoo)


def test_a_bad_message_on_a_stream_fails_that_message_only(zoo: ServiceHandle) -> None:
    frames = (GOOD, b"\x0f" + b"\x00" * 40, request(raw=b"\0" * 12), GOOD)
    with grpc.insecure_channel(zoo.address) as channel:
        outcome = send(channel, Case("bad-stream", b"", grpc.StatusCode.OK, "", stream=frames))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.stream_answers == 4
    assert len(outcome.stream_errors) == 2
    assert "request is not a valid ModelInferRequest" in outcome.stream_errors[0]
    assert "raw data is 12 bytes, expected 16" in outcome.stream_errors[1]


@pytest.mark.timeout(180)
def test_thousands_of_unparsable_frames_leave_memory_flat(start_service: Callable[..., ServiceHandle],
                                                          tmp_path: Path) -> None:
    """grpcio kept ~15 KB for every frame its deserializer refused (+95 MB for 6,000 100-byte
    frames, never released): with the servicer parsing the bytes itself, nothing is kept."""
    service = start_service(build_repo(tmp_path / "repo"), "--no-watch")
    threads = 4
    rng_frames = [b"\x0f" + bytes([i % 251]) * 99 for i in range(64)]

    def hammer(count: int) -> list[grpc.StatusCode]:
        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def worker(offset: int) -> None:
            with grpc.insecure_channel(service.address) as channel:
                for index in range(count // threads):
                    frame = rng_frames[(offset + index) % len(rng_frames)]
                    outcome = send(channel, Case("garbage", frame, grpc.StatusCode.INVALID_ARGUMENT, ""),
                                   timeout=RPC_TIMEOUT_S)
                    with lock:
                        codes.append(outcome.code)
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(120)
        return codes

    warm = hammer(400)  # the handler threads and first-call caches this concurrency needs
    assert set(warm) == {grpc.StatusCode.INVALID_ARGUMENT}, set(warm)
    before = rss_mb(service.process.pid)
    codes = hammer(4000)
    after = rss_mb(service.process.pid)
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, set(codes)
    assert len(codes) == 4000
    assert after <= before * 1.10, f"RSS grew from {before:.0f} MB to {after:.0f} MB over 4,000 bad frames"
    check_still_serving_fp32(service)


def check_still_serving_fp32(service: ServiceHandle) -> None:
    with grpc.insecure_channel(service.address) as channel:
        outcome = send(channel, Case("good", GOOD, grpc.StatusCode.OK, ""), timeout=RPC_TIMEOUT_S)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert service.process.alive()
