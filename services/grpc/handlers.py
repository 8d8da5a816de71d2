"""The gRPC server's handler pool, which counts the inference RPCs it is given as arrivals.

Which RPC a work item belongs to is read from gRPC's call event (its tag or call details); when a
gRPC version stops passing one, nothing is counted and batch leaders simply never wait
(services/arrivals.py).
"""

from __future__ import annotations

import _thread
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import structlog

from services.arrivals import Arrivals

log = structlog.get_logger(__name__)


class _Done:
    """What gRPC needs of the future ``submit`` returns: ``add_done_callback``."""

    __slots__ = ("_callbacks", "_finished", "_lock")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._callbacks: list[Callable[[Any], None]] = []
        self._finished = False

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._finished:
                self._callbacks.append(callback)
                return
        callback(self)

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("handler_done_callback_failed")


_STOP = object()


class HandlerPool:
    """The gRPC server's handler threads: ``concurrent.futures.ThreadPoolExecutor`` trimmed to what
    gRPC uses (``submit`` and the returned future's ``add_done_callback``), with the work items of
    ``counted`` methods entering :class:`Arrivals`.

    ThreadPoolExecutor builds a Future (a Condition and its lock) and a work item per call and
    resolves the Future through Python-level condition code: measured on one core at 32 concurrent
    calls, a visible share of the time of gRPC's single polling thread, which calls ``submit``.
    Threads start on demand, up to ``max_workers``; work beyond that waits in the queue.
    """

    def __init__(self, arrivals: Arrivals, counted: frozenset[str], max_workers: int,
                 thread_name_prefix: str = "handler", batch_policy: bool = False) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.arrivals = arrivals
        self._counted = counted
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        """Threads waiting for work, minus work already queued for them."""
        self._shut_down = False
        self._batch_policy = batch_policy
        """Run the threads under Linux's SCHED_BATCH policy (see :func:`_sched_batch`)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> _Done:
        counted = False
        for arg in args[:3]:
            if _method(arg) in self._counted:
                counted = True
                break
        done = _Done()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot take new work: the handler pool is shut down")
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            if counted:
                self.arrivals.enter()
            self._queue.put((fn, args, kwargs, done, counted))
        return done

    def _work(self) -> None:
        if self._batch_policy:
            _sched_batch()
        arrivals = self.arrivals
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            fn, args, kwargs, done, counted = item
            if counted:
                arrivals.begin()
            try:
                fn(*args, **kwargs)
            except BaseException:
                log.exception("handler_failed")
            finally:
                if counted:
                    arrivals.arrived()
                done.finish()
            # Drop the finished call before waiting for the next one (ThreadPoolExecutor does the
            # same): an idle thread holding its last call event keeps that call, its request bytes
            # and its HTTP/2 stream alive, and the streams count against the connection's
            # max_concurrent_streams (measured: concurrent clients refused with REFUSED_STREAM
            # once 100 threads each held one).
            del item, fn, args, kwargs, done
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; the threads finish what is queued, then exit."""
        with self._lock:
            self._shut_down = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(_STOP)
        if wait:
            for thread in threads:
                thread.join()


def _sched_batch() -> None:
    """Put the calling thread under SCHED_BATCH: a thread that wakes up (a handler given a new
    call, a follower given its rows) no longer preempts the one running, which keeps its core
    until its time slice ends. On one busy core that keeps a batch leader's ONNX Runtime call and
    each handler's Python work from being cut up and interleaved. Measured at 32 concurrent
    clients on one core (medians of 4 interleaved runs): +7 % throughput for a tiny model, level
    for a heavy one (with larger batches); no change at one client. Unprivileged (the nice value
    stays); where the platform has no such policy, nothing changes."""
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setter is None or policy is None:
        return
    try:
        setter(0, policy, os.sched_param(0))
    except OSError as exc:
        log.debug("sched_batch_refused", error=str(exc), consequence="handler threads keep the default policy")


def _method(arg: Any) -> str | None:
    """The full method name of a gRPC call event: its tag for registered methods, its call
    details for generic ones; None for anything else."""
    tag = getattr(arg, "tag", None)
    if isinstance(tag, str) and tag:
        return tag
    method = getattr(getattr(arg, "call_details", None), "method", None)
    return method.decode(errors="replace") if isinstance(method, bytes) and method else None
