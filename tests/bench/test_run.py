"""The benchmark report's arithmetic: median rounds and per-round latency differences."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import loadgen
from bench.run import Point, main, median_points, render_latency_pairs, render_rest_table

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


def test_rest_points_are_kept_apart_from_grpc_and_compared_with_their_own_grpc_and_peers() -> None:
    def point(target: str, protocol: str, rps: float) -> Point:
        return Point(target, "mlp", 8, "ok", rps=rps, p50_ms=1.0, p99_ms=2.0, protocol=protocol)

    rounds = [point("sluice", "grpc", 2000), point("sluice", "json", 1000), point("sluice", "binary", 1500),
              point("pytriton", "binary", 750), point("mlserver", "json", 500),
              Point("mlserver", "mlp", 8, "failed", protocol="binary", note="check before run: HTTP 400")]
    chosen = median_points(rounds)
    assert len(chosen) == len(rounds)  # one per (target, model, concurrency, protocol)
    labels = {"sluice": "sluice", "mlserver": "MLServer", "pytriton": "PyTriton"}
    table = render_rest_table(chosen, ["sluice", "mlserver", "pytriton"], labels, ["json", "binary"])
    rows = table.splitlines()
    assert rows[2].startswith("| mlp | 8 | sluice | REST JSON | 1,000 | 1.000 | 2.000 | 0.50x | - | 2.00x |")
    assert rows[3].startswith("| mlp | 8 | MLServer | REST JSON | 500 |")
    assert rows[4].startswith("| mlp | 8 | sluice | REST binary | 1,500 | 1.000 | 2.000 | 0.75x | 2.00x | 3.00x |")
    assert rows[5] == "| mlp | 8 | MLServer | REST binary | failed | | | | | | | check before run: HTTP 400 |"
    assert render_rest_table([p for p in chosen if p.protocol == "grpc"], ["sluice"], labels, ["json"]) == ""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tiny_run_has_rest_rows_next_to_grpc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real thing, tiny: sluice serve, h2load over HTTP/2 and HTTP/1.1, checked answers."""
    if loadgen.h2load_path() is None:
        pytest.skip("h2load not installed (apt package nghttp2-client)")
    argv = ["--targets", "sluice", "--models", "mlp", "--concurrency", "1,4", "--duration", "0.5",
            "--rest", "json,binary", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for body in ("REST JSON", "REST binary"):
        for conc in (1, 4):
            row = next(line for line in out.splitlines() if line.startswith(f"| mlp | {conc} | sluice | {body} |"))
            assert row.split("|")[5].strip().replace(",", "").isdigit(), row  # req/s measured, not failed
    grpc = next(line for line in out.splitlines() if line.startswith("| mlp | 4 | sluice | "))
    assert grpc.split("|")[4].strip().replace(",", "").isdigit(), grpc  # gRPC first, in the main table
    saved = (tmp_path / "results.json").read_text()
    assert '"protocol": "json"' in saved and '"protocol": "binary"' in saved
