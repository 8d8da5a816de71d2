"""Figures from /metrics text: per-version counts, quantiles from buckets, windows over restarts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from mesh.rollout.figures import bucket_quantile, joined, metrics_address, parse_metrics, window

TEXT = """
# TYPE sluice_requests counter
sluice_requests_total{model="iris",version="2",code="OK"} 90.0
sluice_requests_total{model="iris",version="3",code="OK"} 8.0
sluice_requests_total{model="iris",version="3",code="INTERNAL"} 2.0
sluice_requests_total{model="other",version="3",code="OK"} 1000.0
# TYPE sluice_request_duration_seconds histogram
sluice_request_duration_seconds_bucket{model="iris",version="3",phase="total",le="0.001"} 5.0
sluice_request_duration_seconds_bucket{model="iris",version="3",phase="total",le="0.01"} 8.0
sluice_request_duration_seconds_bucket{model="iris",version="3",phase="total",le="+Inf"} 8.0
sluice_request_duration_seconds_bucket{model="iris",version="3",phase="queue",le="+Inf"} 99.0
sluice_request_duration_seconds_count{model="iris",version="3",phase="total"} 8.0
sluice_request_duration_seconds_sum{model="iris",version="3",phase="total"} 0.01
# TYPE sluice_shadow_compared counter
sluice_shadow_compared_total{model="iris",baseline="2",candidate="3"} 40.0
sluice_shadow_agreed_total{model="iris",baseline="2",candidate="3"} 39.0
sluice_shadow_compared_total{model="iris",baseline="1",candidate="3"} 7.0
"""


def test_parse_keeps_only_the_model_and_its_two_versions() -> None:
    counters = parse_metrics(TEXT, "iris", 2, 3)
    assert counters["versions"]["3"]["codes"] == {"OK": 8.0, "INTERNAL": 2.0}
    assert counters["versions"]["2"]["codes"] == {"OK": 90.0}
    assert counters["versions"]["3"]["buckets"] == {"0.001": 5.0, "0.01": 8.0, "+Inf": 8.0}
    assert counters["shadow"] == {"compared": 40.0, "agreed": 39.0}


def test_window_subtracts_and_counts_a_restarted_instance_from_zero() -> None:
    start = {"a": parse_metrics(TEXT, "iris", 2, 3), "b": parse_metrics(TEXT, "iris", 2, 3)}
    later = TEXT.replace('code="OK"} 8.0', 'code="OK"} 18.0').replace("} 40.0", "} 50.0")
    restarted = ('sluice_requests_total{model="iris",version="3",code="OK"} 3.0\n')
    now = {"a": parse_metrics(later, "iris", 2, 3), "b": parse_metrics(restarted, "iris", 2, 3)}
    fig = window(start, now, 2, 3)
    assert fig.candidate.codes == {"OK": 13, "INTERNAL": 0}
    assert fig.candidate.errors == 0 and fig.restarted == ("b",)
    assert fig.shadow_compared == 10


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = {"0.001": 50.0, "0.01": 100.0, "+Inf": 100.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.001)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.001 + 0.009 * 49 / 50)
    assert bucket_quantile(0.99, {"+Inf": 0.0}) is None


def test_metrics_address_prefers_the_record() -> None:
    assert metrics_address("10.0.0.1:8001", None) == "10.0.0.1:8002"
    assert metrics_address("10.0.0.1:8001", "10.0.0.1:9000") == "10.0.0.1:9000"


def test_an_instance_first_seen_in_a_window_counts_from_now_unless_it_started_in_the_step() -> None:
    step_started = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    history = parse_metrics(TEXT, "iris", 2, 3)
    start = {"a": history}
    now = {"a": history, "old": history, "new": history}
    started = {"old": step_started - timedelta(hours=5), "new": step_started + timedelta(seconds=3)}
    new = joined(start, now, started, step_started)
    assert set(new) == {"old", "new"} and new["old"] == history
    fig = window({**start, **new}, now, 2, 3)
    # The old instance's 10 candidate requests before the window are not in it; the new one's are.
    assert fig.candidate.requests == 10 and fig.candidate.errors == 2
    assert fig.shadow_compared == 40
    # Unknown start time: counted from now (judged from the next round).
    assert joined({}, {"x": history}, {}, step_started) == {"x": history}
