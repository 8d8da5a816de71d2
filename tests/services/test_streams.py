"""ModelStreamInfer against the real service: streams have a bound of their own below the handler
threads (so idle streams, or streams whose clients never read, cannot starve unary calls) and an
idle timeout after which the server ends them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bench.fuzz import GOOD, SERVICE, request
from protos.inference import grpc_service_pb2 as pb
from services.settings import ServiceSettings
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services.clients import RPC_TIMEOUT_S
from tests.services.models import identity, write_model

WAIT_S = 30.0


class StreamClient:
    """One ModelStreamInfer call on its own thread: sends ``frames``, then stays open (sending
    nothing) until :meth:`close`; records the answers it reads and how the call ended."""

    def __init__(self, channel: grpc.Channel, frames: tuple[bytes, ...] = (GOOD,), read: bool = True) -> None:
        self._frames = frames
        self._release = threading.Event()
        self._read = read
        self.answers: list[pb.ModelStreamInferResponse] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended = threading.Event()
        call: Any = channel.stream_stream(f"{SERVICE}/ModelStreamInfer", request_serializer=None,
                                          response_deserializer=pb.ModelStreamInferResponse.FromString)
        self._responses = call(self._requests(), timeout=120)
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[bytes]:
        yield from self._frames
        self._release.wait(120)  # idle: an open stream that sends nothing more

    def _consume(self) -> None:
        try:
            if not self._read:
                self._release.wait(120)
            for answer in self._responses:
                self.answers.append(answer)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
        finally:
            self.ended.set()

    def settled(self) -> bool:
        """Answered its frames, or ended."""
        return self.ended.is_set() or len(self.answers) >= len(self._frames)

    def close(self) -> None:
        self._release.set()
        self._responses.cancel()
        self._thread.join(10)


def _unary(channel: grpc.Channel, timeout: float) -> pb.ModelInferResponse:
    call: Any = channel.unary_unary(f"{SERVICE}/ModelInfer", request_serializer=None,
                                    response_deserializer=pb.ModelInferResponse.FromString)
    return call(GOOD, timeout=timeout)  # type: ignore[no-any-return]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_model(tmp_path / "repo", "identity_fp32", identity("FP32"))
    return tmp_path / "repo"


def test_idle_streams_cannot_take_every_handler_thread(start_service: Callable[..., ServiceHandle],
                                                        repo: Path) -> None:
    """Four idle streams on a service with four handler threads made every unary call time out."""
    service = start_service(repo, "--no-watch", "--max-concurrency", "4")
    with grpc.insecure_channel(service.address) as channel:
        streams = [StreamClient(channel) for _ in range(4)]
        try:
            wait_for(lambda: all(s.settled() for s in streams), WAIT_S, "every stream answered or refused")
            # Unary calls still get a handler thread: a short deadline is plenty.
            assert _unary(channel, timeout=5.0).model_name == "identity_fp32"
            refused = [s for s in streams if s.ended.is_set()]
            open_ = [s for s in streams if not s.ended.is_set()]
            assert len(open_) == 2, [(s.code, s.details) for s in streams]  # half of --max-concurrency
            for stream in refused:
                assert stream.code == grpc.StatusCode.RESOURCE_EXHAUSTED, stream.details
                assert "max_streams" in stream.details and "--max-streams" in stream.details, stream.details
            for stream in open_:
                assert stream.answers[0].error_message == "", stream.answers[0].error_message
        finally:
            for stream in streams:
                stream.close()


def test_idle_stream_is_ended_after_the_idle_timeout(start_service: Callable[..., ServiceHandle],
                                                     repo: Path) -> None:
    service = start_service(repo, "--no-watch", "--max-concurrency", "2", "--stream-idle-timeout", "1")
    with grpc.insecure_channel(service.address) as channel:
        idle = StreamClient(channel)
        try:
            assert idle.ended.wait(WAIT_S), "the idle stream was not ended"
            assert len(idle.answers) == 1 and idle.answers[0].error_message == ""
            assert idle.code == grpc.StatusCode.DEADLINE_EXCEEDED, idle.details
            assert "stream idle for 1 s" in idle.details and "--stream-idle-timeout" in idle.details, idle.details
            # Its place is free again: with --max-concurrency 2 the service allows one stream.
            again = StreamClient(channel, frames=(GOOD, GOOD))
            try:
                wait_for(lambda: len(again.answers) == 2, WAIT_S, "a new stream answered")
                assert not again.ended.is_set() or again.code == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                again.close()
        finally:
            idle.close()
    assert service.process.alive()


def _answered(service: ServiceHandle) -> bool:
    """The service answered a request (counted in its metrics: only the stuck stream sent one)."""
    return any(line.startswith("sluice_requests_total{") and 'model="identity_fp32"' in line
               and not line.endswith(" 0.0") for line in service.metrics_text().splitlines())


def test_stream_whose_client_never_reads_is_ended(start_service: Callable[..., ServiceHandle],
                                                  repo: Path) -> None:
    """A client that sends requests for 4 MiB answers and never reads them holds the handler thread
    in a blocked write: that counts as idle too.

    No probe is sent before the server answered the stuck stream's first request: a probe that
    reached a loaded server first would take the one stream slot and the stuck stream would be
    refused. The idle timeout (4 s) is the time the probes have to see the slot taken, counted
    from that first answer."""
    service = start_service(repo, "--no-watch", "--max-concurrency", "2", "--stream-idle-timeout", "4")
    big = np.zeros((1, 1024 * 1024), dtype=np.float32)
    frame = request(shape=big.shape, raw=big.tobytes())
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(service.address, options=options) as channel:
        stuck = StreamClient(channel, frames=(frame,) * 4, read=False)
        try:
            def probe_accepted() -> bool:
                probe = StreamClient(channel)
                try:
                    wait_for(probe.settled, WAIT_S, "the probe stream answered or was refused")
                    return probe.code is None and len(probe.answers) == 1
                finally:
                    probe.close()
            wait_for(lambda: _answered(service), WAIT_S, "the stuck stream's first request answered")
            # The one stream this service allows is taken by the stuck one...
            assert not probe_accepted(), "a new stream was accepted while the stuck one is open"
            # ...until the server ends it for idling in its blocked write.
            wait_for(probe_accepted, WAIT_S, "a new stream accepted once the stuck one was ended")
            assert "stream_idle_ended" in service.process.log_text()
            assert _unary(channel, timeout=RPC_TIMEOUT_S).model_name == "identity_fp32"
        finally:
            stuck.close()
    assert service.process.alive()


def test_max_streams_must_stay_below_max_concurrency() -> None:
    assert ServiceSettings(max_concurrency=4).stream_limit == 2
    assert ServiceSettings(max_concurrency=4, max_streams=3).stream_limit == 3
    with pytest.raises(ValueError, match=r"max_streams \(4\) must be below max_concurrency \(4\)"):
        ServiceSettings(max_concurrency=4, max_streams=4)
