"""The REST port's settings and a taken REST port: one line naming the flag, exit status 2."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from mesh.ports import free_port
from services.settings import ServiceSettings
from tests.fixtures.service import sluice_argv
from tests.services import models

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("port", "expected"), [(8001, 8003), (9100, 9102), (0, 0), (65534, 0)])
def test_rest_port_follows_port(port: int, expected: int) -> None:
    assert ServiceSettings(port=port).rest_port == expected


def test_rest_port_given_or_off() -> None:
    assert ServiceSettings(port=8001, rest_port=9000).rest_port == 9000
    assert ServiceSettings(rest_port=-1).rest_port == -1


def test_taken_rest_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models.write_model(repo, "identity_fp32", models.identity("FP32"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        result = subprocess.run(
            sluice_argv("serve", "--repo", str(repo), "--port", str(free_port()), "--metrics-port", "-1",
                        "--rest-port", str(taken), "--log-format", "json"),
            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rest-port" in lines[0], result.stderr
