"""Free TCP ports on loopback for processes this process is about to start.

Asking the kernel for port 0 and closing the socket again hands out a port from the ephemeral
range, the same range every outgoing connection takes its local port from. Between handing the
port out and the child process binding it, any connection this machine opens (an etcd client, a
gRPC channel, Envoy's upstream pool) may take it, and the child fails with "address already in
use". So ports come from below the ephemeral range, are checked by binding them, and are never
handed out twice by one process.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)
_LOWEST = 20000  # below: ports that well-known daemons and developers' own servers tend to use
_TRIES = 500

_given: set[int] = set()
_lock = threading.Lock()
_rng = random.Random(os.getpid() ^ time.monotonic_ns())


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (inclusive)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def _candidates() -> range:
    low, high = ephemeral_range()
    if low - _LOWEST >= 1000:
        return range(_LOWEST, low)
    if 65535 - high >= 1000:
        return range(high + 1, 65536)
    return range(1024, 65536)  # an unusual kernel setting: no quiet range; binding still checks


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range, not handed out before here."""
    candidates = _candidates()
    with _lock:
        for _ in range(_TRIES):
            port = _rng.choice(candidates)
            if port not in _given and _bindable(port, host):
                _given.add(port)
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded machine: the kernel's pick
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        _given.add(port)
        return port
