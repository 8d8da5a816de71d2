"""Exponential backoff with jitter, for every retry loop that talks to etcd."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``initial``, times ``factor`` per failure, at most ``maximum`` seconds, +/- ``jitter`` (fraction)."""

    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.2
    _attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        delay = min(self.maximum, self.initial * self.factor ** self._attempt)
        self._attempt += 1
        return max(0.0, delay * (1 + random.uniform(-self.jitter, self.jitter)))  # not crypto

    def reset(self) -> None:
        self._attempt = 0

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay
