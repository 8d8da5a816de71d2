"""Dynamic batching: merge shape-compatible concurrent requests into one ONNX Runtime call.

The queue lives on the event loop; ONNX Runtime runs on the version's own executor threads
(``instances`` of them). With ``max_queue_delay_us: 0`` a batch is whatever queued up while the
previous call ran, which costs a lone request nothing; a positive delay holds a batch open for
more rows until it reaches a preferred size or the maximum.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from services.errors import (
    DeadlineExceededError,
    InferenceError,
    ModelNotReadyError,
    QueueFullError,
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


@dataclass(slots=True)
class _Pending:
    feeds: dict[str, npt.NDArray[Any]]
    rows: int
    key: Hashable
    outputs: tuple[str, ...]
    future: asyncio.Future[BatchResult]
    deadline: float | None
    enqueued: float


def _batch_key(feeds: dict[str, npt.NDArray[Any]], outputs: tuple[str, ...]) -> Hashable:
    """Requests merge only when every input agrees on dtype and on all dimensions but the first."""
    return (tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in feeds.items()), outputs)


class Batcher:
    """The request queue and the ONNX Runtime workers of one model version."""

    def __init__(self, model: OnnxModel, on_execution: Callable[[int, float], None] | None = None) -> None:
        self.model = model
        self._on_execution = on_execution
        config = model.config
        self.max_batch_size = model.max_batch_size
        self.max_queue_size = config.dynamic_batching.max_queue_size
        self._delay = config.dynamic_batching.max_queue_delay_us / 1e6
        self._preferred = frozenset(s for s in config.dynamic_batching.preferred_batch_sizes
                                    if 0 < s <= self.max_batch_size)
        self._instances = config.instances
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=self._instances, thread_name_prefix=f"ort-{model.name}-v{model.version}"
        )
        self._workers: list[asyncio.Task[None]] = []
        self._running = 0
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        for index in range(self._instances):
            self._workers.append(asyncio.create_task(
                self._work(), name=f"batcher-{self.model.name}-v{self.model.version}-{index}"))

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, feeds: dict[str, npt.NDArray[Any]], rows: int, outputs: tuple[str, ...],
                     deadline: float | None) -> BatchResult:
        if self._closing:
            raise ModelNotReadyError(
                f"model '{self.model.name}' version {self.model.version} is unloading")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFullError(
                f"model '{self.model.name}' version {self.model.version}: queue is full "
                f"({self.max_queue_size} requests waiting); retry later"
            )
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(feeds, rows, _batch_key(feeds, outputs), outputs, future, deadline,
                                    time.monotonic()))
        self._idle.clear()
        self._wakeup.set()
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                if self._running == 0:
                    self._idle.set()
                await self._wakeup.wait()
                continue
            # Counted as running from the moment a request leaves the queue, so drain() never
            # sees "idle" while a batch is being held open or executed.
            self._running += 1
            try:
                batch = await self._take_batch()
                if batch:
                    await self._run(loop, batch)
            finally:
                self._running -= 1

    async def _take_batch(self) -> list[_Pending]:
        first = self._queue.popleft()
        if not self._viable(first):
            return []
        if self.max_batch_size == 0:
            return [first]
        if self._delay > 0:
            await self._hold_open(first)
        batch = [first]
        rows = first.rows
        kept: deque[_Pending] = deque()
        while self._queue:
            item = self._queue.popleft()
            if rows < self.max_batch_size and item.key == first.key \
                    and rows + item.rows <= self.max_batch_size:
                if self._viable(item):
                    batch.append(item)
                    rows += item.rows
            else:
                kept.append(item)
        self._queue = kept
        return batch

    async def _hold_open(self, first: _Pending) -> None:
        """Wait up to the queue delay for compatible rows to reach a preferred or the maximum size."""
        until = first.enqueued + self._delay
        while True:
            rows = first.rows + sum(p.rows for p in self._queue if p.key == first.key)
            if rows >= self.max_batch_size or rows in self._preferred:
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _viable(self, item: _Pending) -> bool:
        """Drop requests whose caller went away or whose deadline already passed."""
        if item.future.done():
            return False
        if item.deadline is not None and time.monotonic() >= item.deadline:
            item.future.set_exception(DeadlineExceededError(
                f"deadline exceeded after {time.monotonic() - item.enqueued:.3f}s in the queue of "
                f"model '{self.model.name}' version {self.model.version}; the request was not run"
            ))
            return False
        return True

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        started = time.monotonic()
        outputs = batch[0].outputs
        total = sum(p.rows for p in batch)
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
            results = await loop.run_in_executor(self._executor, self.model.run, feeds, outputs)
        except Exception as exc:  # InferenceError, or anything ORT raised past it: fail this batch only
            error = exc if isinstance(exc, InferenceError) else InferenceError(str(exc))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        compute = time.monotonic() - started
        if self._on_execution is not None:
            self._on_execution(total, compute)
        if len(batch) == 1:
            item = batch[0]
            if not item.future.done():
                item.future.set_result(BatchResult(results, started - item.enqueued, compute, total))
            return
        bad = [i for i, r in enumerate(results) if r.ndim == 0 or r.shape[0] != total]
        if bad:
            error = InferenceError(
                f"model '{self.model.name}' output '{(outputs or self.model.output_names)[bad[0]]}' does not keep "
                f"the batch dimension ({total} rows in, shape {results[bad[0]].shape} out); "
                "set max_batch_size: 0 for this model"
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        offset = 0
        for item in batch:
            end = offset + item.rows
            if not item.future.done():
                item.future.set_result(BatchResult([r[offset:end] for r in results], started - item.enqueued,
                                                   compute, total))
            offset = end

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish queued and running ones, stop the workers.

        Returns False when ``timeout`` passed first (the rest are then failed, not lost silently).
        """
        self._closing = True
        self._wakeup.set()
        finished = True
        if self._queue or self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                finished = False
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(ModelNotReadyError(
                    f"model '{self.model.name}' version {self.model.version} was unloaded before this "
                    "request could run"))
        self._queue.clear()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        return finished
