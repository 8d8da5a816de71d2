"""The gateway benches' arithmetic: paired differences by round, the step and variant tables, and
the per-process CPU counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.gateway_hop import Sample, Target, child_pid, process_cpu_ns, render_steps, render_variants


def _target(name: str, p50s: list[float], rps: float = 1000.0) -> Target:
    target = Target(name, 0)
    for concurrency in (1, 32):
        target.samples[concurrency] = [Sample(rps, p50, p50 * 3, 0.5, 100.0 + p50, 50.0 + 100 * p50, 1.0)
                                       for p50 in p50s]
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


def test_variant_rows_are_paired_with_the_whole_config() -> None:
    whole = _target("whole", [1.0, 3.0, 1.2])
    old = _target("old default", [1.3, 3.2, 1.5], rps=800.0)
    table = render_variants(whole, [old]).splitlines()
    assert table[0].startswith("Against the last step (whole)")
    # c=1 p50 paired +0.3 (rounds +0.3, +0.2, +0.3), Envoy CPU paired +30 µs, throughput 0.80x.
    assert table[4].startswith("| old default | 1.500 | +0.300 | 800 | 0.80x |"), table[4]
    assert "| +30 / +30 |" in table[4], table[4]


def test_process_cpu_counts_every_thread_and_finds_a_named_child() -> None:
    mine = process_cpu_ns(os.getpid())
    sum(i * i for i in range(200_000))
    assert process_cpu_ns(os.getpid()) > mine > 0
    assert process_cpu_ns(None) == 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        name = Path(f"/proc/{child.pid}/comm").read_text().strip()
        assert child_pid(os.getpid(), name, timeout=10) == child.pid
        assert child_pid(os.getpid(), name + "-not", timeout=0.2) is None
    finally:
        child.kill()
        child.wait(timeout=10)
