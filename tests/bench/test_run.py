"""The benchmark report's arithmetic: median rounds and per-round latency differences."""

from __future__ import annotations

from bench.run import Point, median_points, render_latency_pairs

LABELS = {"floor": "floor", "sluice": "sluice"}


def _point(target: str, rps: float, p50: float, round_no: int, conc: int = 1) -> Point:
    return Point(target, "mlp", conc, "ok", rps=rps, p50_ms=p50, p99_ms=p50 * 3, round=round_no)


def test_median_point_is_the_median_round_by_throughput() -> None:
    rounds = [_point("sluice", rps, 1.0, i) for i, rps in enumerate([300.0, 100.0, 200.0])]
    (chosen,) = median_points(rounds)
    assert chosen.rps == 200.0
    assert "median of 3 rounds (100 to 300 req/s)" in chosen.note


def test_latency_pairs_take_differences_within_each_round() -> None:
    # The machine drifts: round 2 is slow for both. Paired differences stay at +0.05 / +0.10.
    floor = [_point("floor", 1000, p50, i) for i, p50 in enumerate([0.40, 0.50, 0.90])]
    sluice = [_point("sluice", 1000, p50, i) for i, p50 in enumerate([0.45, 0.60, 0.95])]
    table = render_latency_pairs([*floor, *sluice], ["floor", "sluice"], LABELS)
    assert "| mlp | sluice | +0.050 | 3 | +0.050, +0.050, +0.100 |" in table


def test_latency_pairs_skip_rounds_without_a_floor_and_single_rounds() -> None:
    points = [_point("floor", 1000, 0.4, 0), _point("sluice", 1000, 0.5, 0), _point("sluice", 1000, 0.5, 1),
              _point("sluice", 1000, 0.5, 2, conc=32), _point("floor", 1000, 0.4, 2, conc=32)]
    assert render_latency_pairs(points, ["floor", "sluice"], LABELS) == ""
