"""The toggle bench: its paired arithmetic, and a short real run against a real service."""

from __future__ import annotations

from pathlib import Path

from bench.shadow import write_repo
from bench.shadow_toggle import Toggled, run


def test_each_running_slice_is_divided_by_its_own_pairs_stopped_one() -> None:
    # The machine slows down between pairs 1 and 2: the ratio of the medians would hide it.
    toggled = Toggled("shadow", [(1000.0, 900.0), (2000.0, 1800.0), (1500.0, 1500.0), (0.0, 10.0)], 0.5, 1)
    assert toggled.ratios == [0.9, 0.9, 1.0]  # a slice with nothing answered is left out
    row = toggled.row().split(" | ")
    assert row[1:4] == ["3", "0.900", "0.900 to 1.000"]
    assert row[4] == "2/3"
    assert Toggled("sleep", [(1.0, 1.0)], 0.0, 0).row().count(" - ") == 5  # too few pairs to judge


def test_a_short_run_stops_and_continues_a_target_beside_a_real_service(tmp_path: Path) -> None:
    toggled = run("sleep", write_repo(tmp_path), tmp_path, clients=2, pairs=2, slice_s=0.2, extra=[], cpus=None)
    assert len(toggled.pairs) == 2
    assert all(stopped > 0 and running > 0 for stopped, running in toggled.pairs)
    assert toggled.compared_per_s == 0.0  # no shadow beside a sleep
