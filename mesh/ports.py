"""Free TCP ports on loopback for processes this process is about to start.

Asking the kernel for port 0 and closing the socket again hands out a port from the ephemeral
range, the same range every outgoing connection takes its local port from. Between handing the
port out and the child process binding it, any connection this machine opens (an etcd client, a
gRPC channel, Envoy's upstream pool) may take it, and the child fails with "address already in
use". So ports come from below the ephemeral range, are checked by binding them, and are never
handed out twice by one process.
"""

from __future__ import annotations

import errno
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


class PortBindError(Exception):
    """A port this process was told to listen on cannot be bound. The message is one line for an
    operator and names the flag to change; the commands print it and exit with status 2."""


def bind_problem(what: str, host: str, port: int, flag: str, reason: str) -> PortBindError:
    """The :class:`PortBindError` for ``what`` (e.g. "the gRPC port") at ``host:port``."""
    return PortBindError(f"cannot listen on {host}:{port} for {what}: {reason}; "
                         f"choose another port with {flag}")


def check_bindable(host: str, port: int, what: str, flag: str) -> None:
    """Raise :class:`PortBindError` if ``host:port`` cannot be bound now (0: any port, always fine).

    A probe before handing the address to a server that reports the failure its own way (gRPC
    core logs a C++ error line and raises RuntimeError; Envoy exits with its own log): the
    operator gets one line naming the flag instead. Binding is checked with SO_REUSEADDR, as the
    servers bind, so a port in TIME_WAIT is not reported; a port another process listens on is.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise bind_problem(what, host, port, flag, f"the address does not resolve ({exc.strerror or exc})") from exc
    failures: list[OSError] = []
    for family, kind, proto, _name, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            # "localhost" may also resolve to ::1 on a host without IPv6: the servers bind what they
            # can, so only a port in use (or forbidden) anywhere, or no address at all, is fatal.
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise bind_problem(what, host, port, flag, exc.strerror or str(exc)) from exc
            failures.append(exc)
    if failures and len(failures) == len(addresses):
        raise bind_problem(what, host, port, flag, failures[0].strerror or str(failures[0])) from failures[0]
