"""The shadow bench's arithmetic: same-round ratios to "off" and the docs table."""

from __future__ import annotations

from bench.shadow import Config, Results, Sample, render


def test_ratios_are_medians_of_same_round_ratios_and_rows_follow_the_configurations() -> None:
    off, idle = Config(0.0), Config(1.0, "idle", "process")
    results = Results()
    # Round 2 is slow for both: the ratio of the medians would be 1.5, the rounds say 1.1 and 1.2.
    for clients in (1, 32):
        for p50_off, p50_idle in ((1.0, 1.1), (10.0, 12.0), (1.2, 1.2 * 1.1)):
            results.add(off, clients, Sample(p50_off, 1000 / p50_off, 0.0, 0.0))
            results.add(idle, clients, Sample(p50_idle, 1000 / p50_idle, 200.0, 0.25, child_rss_mb=140.4))
    assert abs(results.ratio(idle, off, 1, "p50_ms") - 1.1) < 1e-9
    assert abs(results.ratio(idle, off, 1, "rate") - 1 / 1.1) < 1e-9
    table = render(results, [off, idle]).splitlines()
    assert table[2] == "| off | 1 | 1.200 | 833 | 1.00 | 1.00 | 0 | 0.0 % | - |"
    assert table[3] == "| 100 % process | 1 | 1.320 | 758 | 1.10 | 0.91 | 200 | 25.0 % | 140 MB |"
    assert Config(0.1, "nice", "thread").label == "10 % thread nice"
    assert [row.split(" | ")[1] for row in table[2:]] == ["1", "1", "32", "32"]
