"""Dynamic batching: merge shape-compatible concurrent requests into one ONNX Runtime call.

Leader/follower, on the gRPC handler threads themselves: a request that finds a free execution
slot (``instances`` of them per version) leads: it takes a batch from the head of the queue, runs
ONNX Runtime on its own thread and hands every caller its rows. The others wait for their rows, or
for the lead to be handed to them. No thread hop sits between a request and its inference, and
ONNX Runtime never runs on the asyncio loop, which only serves the control plane.

With ``max_queue_delay_us: 0`` a batch is whatever queued up while the previous call ran, which
costs a lone request nothing: one that finds a free slot, an empty queue and nothing else on its
way runs at once without being queued. A positive delay holds a batch open for more rows until it
reaches a preferred size or the maximum.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from services.arrivals import Arrivals
from services.errors import (
    DeadlineExceededError,
    InferenceError,
    ModelNotReadyError,
    QueueFullError,
    ServiceError,
    VersionRetiredError,
)
from services.model import OnnxModel

log = structlog.get_logger(__name__)

Arrays = list[npt.NDArray[Any]]


@dataclass(slots=True)
class BatchResult:
    outputs: Arrays
    queue_seconds: float
    compute_seconds: float
    batch_rows: int


class _Signal:
    """A one-shot wake-up for one waiting thread: a bare lock, created held (cheaper than a
    ``threading.Event``, whose wait and set run Python-level condition code on every request).
    Setting it twice is harmless."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            with contextlib.suppress(RuntimeError):  # released already: a racing second set
                self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()


@dataclass(slots=True)
class Pending:
    """One queued request. What a batch's accounting callback reads: ``rows``, ``since`` (when the
    request reached the data plane) and ``enqueued``, all ``time.monotonic()``."""

    feeds: dict[str, npt.NDArray[Any]]
    rows: int
    outputs: tuple[str, ...]
    deadline: float | None
    enqueued: float
    since: float
    event: _Signal | None = None
    """Only a request that waits gets one (made under the lock, before it waits)."""
    result: BatchResult | None = None
    error: ServiceError | None = None
    lead: bool = False
    """The request's thread holds an execution slot: it led from the start, or a finishing leader
    handed its slot over (and set ``event``)."""

    _key: Hashable = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def key(self) -> Hashable:
        """Requests merge only when every input agrees on dtype and on all dimensions but the
        first (computed when first compared: a lone request never needs it)."""
        if self._key is None:
            self._key = (tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in self.feeds.items()),
                         self.outputs)
        return self._key


OnBatch = Callable[[Sequence[Pending], int, float, float], None]
"""Accounting of one successful ONNX Runtime call: (requests, rows, started, done)."""


class Batcher:
    """The request queue and execution slots of one model version. Thread-safe.

    ``on_batch`` is called once per successful ONNX Runtime call, on the leader's thread, before
    any of the batch's callers sees its result: the statistics and metrics of every request in
    the batch are recorded there at once, not by each request under a lock of its own.
    ``after_batch`` is called by the leader once the batch's callers have their results: for
    bookkeeping that should delay none of them.
    """

    def __init__(self, model: OnnxModel, on_batch: OnBatch | None = None, arrivals: Arrivals | None = None,
                 after_batch: Callable[[], None] | None = None) -> None:
        self.model = model
        self._on_batch = on_batch
        self._after_batch = after_batch
        self._arrivals = arrivals
        config = model.config
        self.max_batch_size = model.max_batch_size
        self.max_queue_size = config.dynamic_batching.max_queue_size
        self._delay = config.dynamic_batching.max_queue_delay_us / 1e6
        self._arrival_wait = config.dynamic_batching.arrival_wait_us / 1e6
        self._queued_rows = 0
        """Rows in the queue (any shape), kept under the lock; read without it by settling leaders."""
        self._preferred = frozenset(s for s in config.dynamic_batching.preferred_batch_sizes
                                    if 0 < s <= self.max_batch_size)
        self._instances = config.instances
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        """Notified when a request is queued (a leader holding a batch open waits on it)."""
        self._idle = threading.Condition(self._lock)
        self._queue: deque[Pending] = deque()
        self._leaders = 0
        self._running = 0
        """Requests in batches being run (taken off the queue, not yet answered)."""
        self._closing = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Requests queued or running (read without the lock: a gauge)."""
        return len(self._queue) + self._running

    def submit(self, feeds: dict[str, npt.NDArray[Any]], rows: int, outputs: tuple[str, ...],
               deadline: float | None, since: float | None = None) -> BatchResult:
        """Run one request (possibly inside a larger batch); blocks the calling thread until done.

        ``since``: when the request reached the service (its total time counts from there)."""
        now = time.monotonic()
        item = Pending(feeds, rows, outputs, deadline, now, now if since is None else since)
        with self._lock:
            if self._closing:
                raise VersionRetiredError(f"model '{self.model.name}' version {self.model.version} is unloading")
            if len(self._queue) >= self.max_queue_size:
                raise QueueFullError(
                    f"model '{self.model.name}' version {self.model.version}: queue is full "
                    f"({self.max_queue_size} requests waiting); retry later")
            lead = self._leaders < self._instances
            arrivals = self._arrivals
            if (lead and not self._queue and self._delay <= 0
                    and (arrivals is None or not arrivals.others_arriving())):
                # Alone: a free slot, nothing queued, nothing on its way, no delay asked for.
                # Run at once, without queueing (see _solo).
                self._leaders += 1
                self._running += 1
                solo, full = True, False
            else:
                solo = False
                self._queue.append(item)
                self._queued_rows += rows
                full = 0 < self.max_batch_size <= self._queued_rows
                if lead:
                    self._leaders += 1
                    item.lead = True  # holds a slot: a hand-off must skip it
                else:
                    item.event = event = _Signal()
                    self._arrived.notify()
        if arrivals is not None:
            arrivals.arrived()
            if full and not lead:
                arrivals.wake()
        if solo:
            self._solo(item)
            return self._outcome(item)
        if not lead:
            event.wait()
            if not item.lead:
                return self._outcome(item)
        self._lead(item)
        return self._outcome(item)

    def _solo(self, item: Pending) -> None:
        """Run a lone request as a batch of one; it holds a slot and is counted as running.
        Whatever queued meanwhile is handed the slot afterwards, as a leader's batch would."""
        try:
            if not self._answer_if_expired(item):
                self._run([item])
                if self._after_batch is not None:
                    self._after("after_batch", self._after_batch)
        finally:
            with self._lock:
                self._running -= 1
                self._hand_off()

    def _batch_full(self) -> bool:
        return self._queued_rows >= self.max_batch_size

    @staticmethod
    def _outcome(item: Pending) -> BatchResult:
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _lead(self, own: Pending) -> None:
        """Run batches from the head of the queue until ``own`` is answered, then pass the slot on."""
        while True:
            if self.max_batch_size and self._arrival_wait > 0 and self._arrivals is not None:
                # Requests the server already accepted are still being received and decoded on
                # other handler threads (on a busy core they only get the CPU when this leader
                # gives it up): let them queue before the batch is taken. Nothing arriving, no
                # wait: a lone request pays nothing.
                self._arrivals.settle(self._arrival_wait, self._batch_full)
            with self._lock:
                batch = self._take_batch()
            if batch:
                self._run(batch)
                if self._after_batch is not None:
                    self._after("after_batch", self._after_batch)
            with self._lock:
                self._running -= len(batch)
                if own.done or not batch:
                    self._hand_off()
                    break
        if not own.done:
            # The queue ran dry without our request: another leader holds it in its batch. Wait
            # for it (no hand-off can reach it, it is not queued). A fresh event, then a second
            # look: the other leader may finish between the two.
            own.event = event = _Signal()
            if not own.done:
                event.wait()

    def _hand_off(self) -> None:
        """Give this execution slot to the first queued follower, or free it. Called with the lock."""
        for waiting in self._queue:
            if not waiting.lead:  # a follower; queued requests of leaders already hold a slot
                waiting.lead = True
                assert waiting.event is not None
                waiting.event.set()
                return
        self._leaders -= 1
        if self._closing and self._leaders == 0 and not self._queue:
            self._idle.notify_all()  # drain() waits for this

    def _take_batch(self) -> list[Pending]:
        """Pop a batch of compatible requests off the head of the queue. Called with the lock."""
        batch = self._pick_batch()
        self._queued_rows = sum(p.rows for p in self._queue) if self._queue else 0
        self._running += len(batch)
        return batch

    def _pick_batch(self) -> list[Pending]:
        while self._queue:
            first = self._queue.popleft()
            if not self._answer_if_expired(first):
                break
        else:
            return []
        if self.max_batch_size == 0:
            return [first]
        if self._delay > 0:
            self._hold_open(first)
        if not self._queue:
            return [first]
        batch = [first]
        rows = first.rows
        kept: deque[Pending] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.key == first.key and rows + item.rows <= self.max_batch_size:
                if not self._answer_if_expired(item):
                    batch.append(item)
                    rows += item.rows
            else:
                kept.append(item)
        self._queue = kept
        return batch

    def _hold_open(self, first: Pending) -> None:
        """Wait (lock released) up to the queue delay for compatible rows to reach a preferred size."""
        until = first.enqueued + self._delay
        while True:
            rows = first.rows + sum(p.rows for p in self._queue if p.key == first.key)
            if rows >= self.max_batch_size or rows in self._preferred:
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.wait(remaining)

    def _answer_if_expired(self, item: Pending) -> bool:
        """Answer a request whose deadline already passed (DEADLINE_EXCEEDED) instead of running
        it; True when it was answered so."""
        if item.deadline is not None and time.monotonic() >= item.deadline:
            self._finish(item, error=DeadlineExceededError(
                f"deadline exceeded after {time.monotonic() - item.enqueued:.3f}s in the queue of "
                f"model '{self.model.name}' version {self.model.version}; the request was not run"))
            return True
        return False

    @staticmethod
    def _finish(item: Pending, result: BatchResult | None = None, error: ServiceError | None = None) -> None:
        item.result, item.error = result, error
        event = item.event  # read after the result: a waiter that set one up sees either
        if event is not None:
            event.set()

    def _run(self, batch: list[Pending]) -> None:
        """One ONNX Runtime call for the batch, on this (handler) thread, lock not held."""
        started = time.monotonic()
        outputs = batch[0].outputs
        total = batch[0].rows if len(batch) == 1 else sum(p.rows for p in batch)
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
            results = self.model.run(feeds, outputs)
        except Exception as exc:  # InferenceError, or anything past it: fail this batch only
            error = exc if isinstance(exc, InferenceError) else InferenceError(str(exc))
            for item in batch:
                self._finish(item, error=error)
            return
        done = time.monotonic()
        compute = done - started
        if len(batch) == 1:
            item = batch[0]
            self._account(batch, total, started, done)
            self._finish(item, BatchResult(results, started - item.enqueued, compute, total))
            return
        bad = [i for i, r in enumerate(results) if r.ndim == 0 or r.shape[0] != total]
        if bad:
            error = InferenceError(
                f"model '{self.model.name}' output '{self.model.selected_outputs(outputs)[bad[0]]}' "
                f"does not keep the batch dimension ({total} rows in, shape {results[bad[0]].shape} out); "
                "set max_batch_size: 0 for this model")
            for item in batch:
                self._finish(item, error=error)
            return
        self._account(batch, total, started, done)
        offset = 0
        for item in batch:
            end = offset + item.rows
            self._finish(item, BatchResult([r[offset:end] for r in results], started - item.enqueued,
                                           compute, total))
            offset = end

    def _account(self, batch: list[Pending], rows: int, started: float, done: float) -> None:
        """Record a successful call; a failure to record must not keep its callers waiting."""
        if self._on_batch is not None:
            self._after("on_batch", self._on_batch, batch, rows, started, done)

    def _after(self, what: str, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("batch_bookkeeping_failed", callback=what, model=self.model.name,
                          version=self.model.version, consequence="the requests are answered anyway")

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait (blocking) for queued and running ones to finish.

        Returns False when ``timeout`` passed first; what is still queued then is answered with
        an error, never left hanging.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closing = True
            while self._queue or self._leaders:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._idle.wait(remaining)
            finished = not self._queue and not self._leaders
            for item in self._queue:
                self._finish(item, error=ModelNotReadyError(
                    f"model '{self.model.name}' version {self.model.version} was unloaded before this request "
                    "could run"))
            self._queue.clear()
            self._queued_rows = 0
        return finished
