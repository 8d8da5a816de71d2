"""bench/rest_servers.py: the tables' arithmetic, and one tiny real run (sluice serve with uvicorn,
granian when bench/.venvs/granian is installed, REST off; real h2load, real ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import loadgen, rest_servers
from bench.rest_servers import GRANIAN, REST_OFF, UVICORN, Sample, Server, render_grpc, render_rest


def _server(name: str, rest: bool, samples: dict[tuple[str, int], list[tuple[float, float]]]) -> Server:
    server = Server(name, 0, 1 if rest else None)
    for key, values in samples.items():
        server.samples[key] = [Sample(rps, p50, p50 * 2, 100.0, other_rps=rps / 2) for rps, p50 in values]
    return server


def test_rest_rows_pair_each_round_with_uvicorns() -> None:
    # Round 2 is slow for both servers: granian is 2x / +0.1 ms in every round.
    uvicorn = _server(UVICORN, True, {("json", 1): [(1000, 0.5), (500, 1.0), (1000, 0.5)],
                                      ("json", 32): [(2000, 10.0), (1000, 20.0), (2000, 10.0)]})
    granian = _server(GRANIAN, True, {("json", 1): [(1100, 0.6), (550, 1.1), (1100, 0.6)],
                                      ("json", 32): [(4000, 5.0), (2000, 10.0), (4000, 5.0)]})
    table = render_rest([uvicorn, granian, _server(REST_OFF, False, {})], ["json"], [1, 32]).splitlines()
    assert table[0].count("|") == table[1].count("|")
    assert table[2].startswith("| uvicorn + httptools | json | 0.500 | 1.000 | 1,000 | 2,000 | 10.00 | 100 / 100 |")
    assert table[3].endswith("| +0.100 ms | 2.00x |")
    assert len(table) == 4  # REST off has no REST rows


def test_a_skipped_server_says_why() -> None:
    granian = Server(GRANIAN, 0, 1, skipped="granian not installed")
    table = render_rest([granian], ["binary"], [1])
    assert "| granian | binary | skipped: granian not installed |" in table


def test_grpc_rows_compare_with_rest_off_and_with_grpc_alone_on_the_same_service() -> None:
    off = _server(REST_OFF, False, {("grpc", 1): [(1000, 0.40)] * 3, ("grpc", 32): [(3000, 10.0)] * 3})
    uvicorn = _server(UVICORN, True, {("grpc", 1): [(1000, 0.42)] * 3, ("grpc", 32): [(2970, 10.0)] * 3,
                                      ("grpc+rest", 32): [(1500, 20.0)] * 3})
    lines = render_grpc([off, uvicorn], [1, 32], "json").splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[3].count("|")
    assert lines[2].startswith("| REST off | 0.400 |  | 3,000 |  |")
    # gRPC under load 1,500 req/s, REST meanwhile 750 (the fake's half), together 2,250; 0.51x kept.
    assert lines[3] == ("| uvicorn + httptools, REST port idle | 0.420 | +0.020 ms | 2,970 | 0.99x | 1,500 | 750 "
                        "| 2,250 | 0.51x |")


def test_rest_bodies_are_what_the_clients_send() -> None:
    inputs = {"input": np.arange(4, dtype=np.float32).reshape(1, 4)}
    plain = loadgen.encode_rest(inputs, "json")
    assert b'"data": [0.0, 1.0, 2.0, 3.0]' in plain.body
    binary = loadgen.encode_rest(inputs, "binary")
    length = int(dict(h.split(": ", 1) for h in binary.headers)[loadgen.HEADER_LENGTH])
    assert binary.body[length:] == inputs["input"].tobytes()
    assert b'"binary_data_size":16' in binary.body[:length]
    command = loadgen.h2load_command(8000, Path("b.bin"), 32, duration=1, protocol=binary.protocol("m"))
    assert command[1:9] == ["--h1", "-c", "32", "-t", "1", "-m", "1", "-D"]
    assert command[-1] == "http://127.0.0.1:8000/v2/models/m/infer"
    with pytest.raises(ValueError, match="unknown REST body kind 'xml'"):
        loadgen.encode_rest(inputs, "xml")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tiny_run_measures_every_server_it_has(capsys: pytest.CaptureFixture[str]) -> None:
    if loadgen.h2load_path() is None:
        pytest.skip("h2load not installed (apt package nghttp2-client)")
    assert rest_servers.main(["--duration", "0.3", "--rounds", "1", "--concurrency", "1,2"]) == 0
    out = capsys.readouterr().out
    for kind in ("json", "binary"):
        assert f"| {UVICORN} | {kind} | " in out
        if rest_servers.granian_unavailable():
            assert f"| {GRANIAN} | {kind} | skipped: granian not installed" in out
        else:
            row = next(line for line in out.splitlines() if line.startswith(f"| {GRANIAN} | {kind} | "))
            assert "skipped" not in row and row.endswith("x |")  # measured, with its ratio to uvicorn
    assert f"| {REST_OFF} | " in out
    assert f"| {UVICORN}, REST port idle | " in out
