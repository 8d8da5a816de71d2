"""The gateway benches' arithmetic: paired differences by round and the step table."""

from __future__ import annotations

from bench.gateway_hop import Sample, Target, render_steps


def _target(name: str, p50s: list[float], rps: float = 1000.0) -> Target:
    target = Target(name, 0)
    for concurrency in (1, 32):
        target.samples[concurrency] = [Sample(rps, p50, p50 * 3, 0.5, 100.0 + p50) for p50 in p50s]
    return target


def test_paired_difference_is_the_median_of_same_round_differences() -> None:
    # Round 2 is slow for both: the medians differ by 0.5, the rounds by 0.1 each time.
    direct = _target("direct", [0.4, 2.0, 0.5])
    step = _target("step", [0.5, 2.1, 0.6])
    assert abs(step.paired(direct, 1, "p50_ms") - 0.1) < 1e-9
    assert abs(step.median(1, "p50_ms") - direct.median(1, "p50_ms") - 0.1) < 1e-9


def test_step_rows_compare_each_step_with_the_one_before_and_with_direct() -> None:
    direct = _target("direct", [0.4, 0.4, 0.4])
    bare = _target("bare", [0.6, 0.7, 0.6])
    routes = _target("routes", [0.65, 0.75, 0.7], rps=500.0)
    table = render_steps(direct, [bare, routes]).splitlines()
    assert table[2].startswith("| bare | 0.600 | +0.200 | +0.200 | 1,000 | 1.00x |")
    assert table[3].startswith("| routes | 0.700 | +0.050 | +0.300 | 500 | 0.50x |")
