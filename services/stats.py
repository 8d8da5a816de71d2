"""Per-version counters in the shape of Triton's ModelStatistics (durations in nanoseconds)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    """Rows inferred (a batch of 8 rows counts 8)."""
    execution_count: int = 0
    """ONNX Runtime calls."""
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)
    """Per batch size: how many calls and their compute time."""

    def record_success(self, rows: int, total: float, queue: float) -> None:
        self.success.add(total)
        self.queue.add(queue)
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)

    def record_execution(self, batch_rows: int, compute: float) -> None:
        self.execution_count += 1
        self.compute_infer.add(compute)
        self.batches.setdefault(batch_rows, Duration()).add(compute)
