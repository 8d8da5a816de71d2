"""The log of answered requests and what it folds into: Triton statistics and Prometheus series."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from services.config import ModelConfig
from services.metrics import VersionMetrics
from services.model import OnnxModel
from services.served import ServedVersion
from services.stats import FOLD_AT, BatchLog, VersionStats
from tests.services import models


@dataclass
class _Answered:
    since: float
    enqueued: float


def test_a_folded_log_gives_per_request_and_per_call_figures() -> None:
    log = BatchLog()
    # One call answering three requests (4 rows), then one answering a single request (2 rows).
    log.add([_Answered(10.0, 10.1), _Answered(10.05, 10.2), _Answered(10.1, 10.3)], 4, 10.5, 10.75)
    log.add([_Answered(20.0, 20.0)], 2, 20.25, 20.5)
    assert len(log) == 4
    samples = log.take()
    assert samples is not None and len(log) == 0 and log.take() is None
    stats, metrics = VersionStats(), VersionMetrics("m", 1)
    stats.add(samples)
    metrics.add(samples)
    assert stats.success.count == 4
    assert stats.success.ns == pytest.approx((0.75 + 0.70 + 0.65 + 0.5) * 1e9)
    assert stats.queue.ns == pytest.approx((0.4 + 0.3 + 0.2 + 0.25) * 1e9)
    assert (stats.inference_count, stats.execution_count) == (6, 2)
    assert stats.compute_infer.count == 2 and stats.compute_infer.ns == pytest.approx(0.5e9)
    assert {size: (d.count, d.ns) for size, d in stats.batches.items()} == {4: (1, 250_000_000),
                                                                           2: (1, 250_000_000)}
    assert stats.last_inference_ms > 0
    assert metrics.codes == {"OK": 4}
    assert metrics.total.count == 4 and metrics.total.sum == pytest.approx(2.6)
    assert metrics.compute.count == 4  # each request counts its batch's call
    assert metrics.batch.count == 2 and metrics.batch.sum == 6


def test_bulk_histogram_buckets_match_one_by_one() -> None:
    """A value equal to a bucket bound belongs to that bucket, as Prometheus' ``le`` says."""
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.exponential(0.01, 500), [0.0001, 0.001, 0.01, 10.0, 99.0]])
    histogram = VersionMetrics("m", 1).total
    expected = [0] * (len(histogram.bounds) + 1)
    for value in values.tolist():
        expected[bisect_left(histogram.bounds, value)] += 1
    histogram.observe_all(values)
    assert histogram.counts == expected
    assert histogram.sum == pytest.approx(float(values.sum()))
    assert histogram.cumulative()[-1] == ("+Inf", len(values))


def test_the_leader_folds_a_long_log_and_reads_see_every_request(tmp_path: Path) -> None:
    path = models.write_model(tmp_path, "ident", models.identity("INT64"))
    metrics = VersionMetrics("ident", 1)
    served = ServedVersion.start(OnnxModel("ident", 1, path, ModelConfig(max_batch_size=8)), metrics)
    row = np.ones((1, 2), np.int64)
    for _ in range(FOLD_AT + 10):
        served.batcher.submit({"x": row}, 1, (), None)
    assert len(served.batch_log) < FOLD_AT, "the log was never folded"
    assert served.stats.success.count >= FOLD_AT  # folded without any reader
    metrics.flush()  # what a scrape does
    assert served.stats.success.count == FOLD_AT + 10 and len(served.batch_log) == 0
    assert metrics.codes["OK"] == FOLD_AT + 10 and metrics.inflight == 0
    metrics.detach(served)
    assert metrics.inflight == 0
    assert served.batcher.drain(5)
