"""A port that cannot be bound stops ``sluice serve`` with one line naming the flag, exit status 2.

Real ``sluice serve`` processes on one host: the first holds its ports, the second is started
beside it with one of them the same, as when an operator copies a command and changes only --port.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from mesh.ports import free_port
from tests.fixtures.processes import ManagedProcess
from tests.fixtures.service import ServiceHandle, sluice_argv

pytestmark = pytest.mark.timeout(120)

EXIT_TIMEOUT_S = 60.0


def _second(repo: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # REST off: its default port (--port + 2) is reserved by nobody here, and not under test.
    return subprocess.run(sluice_argv("serve", "--repo", str(repo), "--log-format", "json", "--rest-port", "-1",
                                      *flags),
                          capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


def test_taken_metrics_port_is_one_line_naming_metrics_port(
        start_service: Callable[..., ServiceHandle], repo: Path) -> None:
    first = start_service(repo)
    line = _one_line_error(_second(repo, "--port", str(free_port()), "--metrics-port", str(first.metrics_port)))
    assert line == (f"sluice serve: cannot listen on 127.0.0.1:{first.metrics_port} for metrics: Address already "
                    "in use; choose another port with --metrics-port (default --port + 1; -1 turns metrics off)")
    assert first.ready()


def test_taken_grpc_port_is_one_line_naming_port(start_service: Callable[..., ServiceHandle], repo: Path) -> None:
    first = start_service(repo)
    line = _one_line_error(_second(repo, "--port", str(first.port), "--metrics-port", str(free_port())))
    assert line == (f"sluice serve: cannot listen on 127.0.0.1:{first.port} for gRPC: Address already in use; "
                    "choose another port with --port")
    assert first.ready()


def _port_pair() -> int:
    """A free port whose two successors are free too (the derived metrics and REST ports)."""
    for _ in range(100):
        port = free_port()
        if all(_bindable(port + step) for step in (1, 2)):
            return port
    pytest.fail("no three consecutive free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_services_that_differ_only_in_port_both_start(process_factory: Callable[..., ManagedProcess],
                                                      repo: Path) -> None:
    """The reported case: --metrics-port not given, so it follows --port instead of both taking 8002."""
    handles = []
    for port in (_port_pair(), _port_pair()):
        argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--log-format", "json")
        handles.append(ServiceHandle(process_factory("sluice-serve", argv), port, port + 1, repo))
    for handle in handles:
        handle.process.wait_until(handle.ready, EXIT_TIMEOUT_S, "ServerReady")
        assert "sluice_" in handle.metrics_text()  # served on --port + 1
