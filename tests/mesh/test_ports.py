"""Free ports: never twice, never from the ephemeral range, never one something listens on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mesh import ports


def test_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    low, high = ports.ephemeral_range()
    handed = [ports.free_port() for _ in range(300)]
    assert len(set(handed)) == len(handed)
    assert all(not low <= port <= high for port in handed)
    for port in handed[:20]:  # still free: a child process could bind each of them
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = int(listener.getsockname()[1])
        monkeypatch.setattr(ports, "_candidates", lambda: range(busy, busy + 2))
        monkeypatch.setattr(ports, "_given", set())
        monkeypatch.setattr(ports, "_TRIES", 50)
        # busy + 1 is the only candidate left; if it happens to be in use too the kernel picks.
        port = ports.free_port()
        assert port != busy


def test_ephemeral_range_falls_back_when_unreadable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
    odd = tmp_path / "range"
    odd.write_text("10000\t65000\n")
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE_FILE", odd)
    assert ports.ephemeral_range() == (10000, 65000)
    assert ports._candidates() == range(1024, 65536)
