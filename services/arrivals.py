"""Requests the server has accepted but that have not reached a batch queue yet.

On a busy core, a batch leader that takes "whatever is queued" right after the previous batch
finds few rows: the requests that arrived meanwhile sit on handler threads waiting for the CPU,
still being received and decoded. :class:`Arrivals` counts them (from the moment gRPC hands an
inference RPC to the handler pool until the request is queued or answered), so a leader can let
them in before it takes its batch (:meth:`Arrivals.settle`, bounded by the model's
``dynamic_batching.arrival_wait_us``). A lone request counts nothing and waits for nothing.

The gRPC server's handler pool (services/grpc/handlers.py) enters the inference RPCs it is given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Arrivals:
    """A thread-safe count of accepted, not yet queued inference requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._pending = 0
        self._waiters = 0
        self._local = threading.local()

    @property
    def pending(self) -> int:
        return self._pending

    def others_arriving(self) -> bool:
        """Requests on their way besides the calling thread's own (read without the lock)."""
        return self._pending > (1 if getattr(self._local, "pending", False) else 0)

    def enter(self) -> None:
        """One more request on its way (called where the transport accepts it)."""
        with self._lock:
            self._pending += 1

    def begin(self) -> None:
        """The calling thread now works on an entered request (see :meth:`arrived`)."""
        self._local.pending = True

    def arrived(self) -> None:
        """The calling thread's request reached a queue, or was answered. Idempotent."""
        local = self._local
        if getattr(local, "pending", False):
            local.pending = False
            self.cancel()

    def cancel(self) -> None:
        """One request fewer on its way (it never reached a handler thread)."""
        with self._lock:
            self._pending -= 1
            if self._waiters and self._pending <= 0:
                self._settled.notify_all()

    def wake(self) -> None:
        """Let settling leaders look again (a queue just filled a batch)."""
        with self._lock:
            if self._waiters:
                self._settled.notify_all()

    def settle(self, timeout: float, enough: Callable[[], bool]) -> None:
        """Wait up to ``timeout`` s while requests are arriving, unless ``enough()`` already."""
        if self._pending <= 0:  # the common case under light load: no lock taken
            return
        with self._lock:
            if self._pending <= 0 or enough():
                return
            deadline = time.monotonic() + timeout
            self._waiters += 1
            try:
                while self._pending > 0 and not enough():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    self._settled.wait(remaining)
            finally:
                self._waiters -= 1
