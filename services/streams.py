"""Bounds on ModelStreamInfer streams: how many may be open at once, and how long one may sit idle.

The synchronous gRPC server runs a stream's handler on one of its handler threads for the whole
life of the stream: the thread blocks while it waits for the client's next message, and while it
waits for the client to take an answer (flow control). Unbounded, a few idle streams, or streams
whose clients never read, hold every handler thread and no unary call is answered any more.
So streams get a bound of their own below the number of handler threads (:class:`StreamGuard`
refuses one over it at once), and a stream that made no progress (no message received, no answer
taken) for the idle timeout is ended by the server with DEADLINE_EXCEEDED, which frees its thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import structlog

from services.errors import StreamLimitError

log = structlog.get_logger(__name__)


class Stream:
    """One open stream's idle clock. ``busy()`` while the server works on a message (inference has
    its own deadline); ``idle()`` whenever the stream waits on the client again."""

    __slots__ = ("_context", "_idle_since", "expired")

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self._idle_since: float | None = time.monotonic()
        self.expired = False
        """Ended by the server for being idle (the handler then returns quietly)."""

    def busy(self) -> None:
        self._idle_since = None

    def idle(self) -> None:
        self._idle_since = time.monotonic()

    def idle_for(self, now: float) -> float:
        since = self._idle_since
        return 0.0 if since is None else now - since

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """End the call from another thread with ``code``: the handler thread blocked in the call
        wakes up with an error. ``context.abort`` cannot do this (it only raises in the calling
        thread), so the call is cancelled with a status, which the client receives as it is; on a
        gRPC without that call the stream is cancelled plainly (the client sees CANCELLED)."""
        self.expired = True
        call: Any = getattr(getattr(self._context, "_rpc_event", None), "call", None)
        try:
            call.cancel(code.value[0], details)
        except Exception:  # not the grpcio internals this was written against
            try:
                self._context.cancel()
            except Exception:
                log.exception("stream_cancel_failed")


class StreamGuard:
    """Counts open streams against ``limit`` and ends those idle for ``idle_timeout`` seconds."""

    def __init__(self, limit: int, idle_timeout: float) -> None:
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._open: set[Stream] = set()
        self._watchdog: threading.Thread | None = None
        self._wake = threading.Event()

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def open(self, context: grpc.ServicerContext) -> Stream:
        """A new stream's clock, or :class:`StreamLimitError` when ``limit`` streams are open."""
        stream = Stream(context)
        with self._lock:
            if len(self._open) >= self.limit:
                raise StreamLimitError(
                    f"too many ModelStreamInfer streams: {len(self._open)} are open and the service allows "
                    f"{self.limit} (setting max_streams, --max-streams; streams are kept below "
                    "max_concurrency so that unary calls always have a handler thread); retry later, "
                    "or send ModelInfer calls")
            self._open.add(stream)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="stream-watchdog", daemon=True)
                self._watchdog.start()
        return stream

    def close(self, stream: Stream) -> None:
        with self._lock:
            self._open.discard(stream)

    def stop(self) -> None:
        self._wake.set()

    def _watch(self) -> None:
        # A tick of a quarter of the timeout ends an idle stream at most 25 % late; one second at
        # most, so a long timeout costs one wake-up a second and nothing per stream.
        tick = min(1.0, self.idle_timeout / 4)
        while not self._wake.wait(tick):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._open if not s.expired and s.idle_for(now) >= self.idle_timeout]
            for stream in idle:
                if stream.idle_for(time.monotonic()) < self.idle_timeout:
                    continue  # a message arrived since the look under the lock
                # The watchdog must outlive any one stream's failure: a dead watchdog would leave
                # idle streams holding handler threads for good.
                try:
                    log.info("stream_idle_ended", idle_timeout=self.idle_timeout)
                    stream.end(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"stream idle for {self.idle_timeout:g} s (no request received and no answer "
                               "taken): ended by the server (setting stream_idle_timeout, --stream-idle-timeout)")
                except Exception:
                    log.exception("stream_idle_end_failed")
