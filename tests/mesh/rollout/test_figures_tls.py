"""The rollout controller's scrape of a service whose admin port requires the admin identity
(``sluice serve --admin-tls-client-ca``): a real `sluice serve`, real handshakes. Without the
admin certificate the scrape is a clear problem of that instance; with it, the counters."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from mesh.devstack.pki import DevPki, ensure_dev_pki
from mesh.rollout.command import RolloutControllerSettings
from mesh.rollout.figures import SCRAPE_TOTAL_TIMEOUTS, ScrapeTls, TlsSource, scrape, scrape_tls
from tests.fixtures.service import ServiceHandle
from tests.services.clients import raw_request, stub_for
from tests.services.models import identity, write_model

pytestmark = pytest.mark.timeout(120)
MODEL = "echo"


@pytest.fixture
def service(start_service: Callable[..., ServiceHandle], pki: DevPki, tmp_path: Path) -> ServiceHandle:
    repo = tmp_path / "repo"
    write_model(repo, MODEL, identity("FP32", [1, 4]), version=1)
    handle = start_service(repo, "--admin-tls-cert", str(pki.service.cert), "--admin-tls-key", str(pki.service.key),
                           "--admin-tls-client-ca", str(pki.admin_ca.cert))
    with stub_for(handle) as stub:
        stub.ModelInfer(raw_request(MODEL, {"x": ("FP32", np.ones((1, 4), np.float32))}), timeout=10)
    return handle


def _scrape(handle: ServiceHandle, tls: TlsSource = None,
            server_name: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    targets = {"up-1": f"127.0.0.1:{handle.metrics_port}"}
    return asyncio.run(scrape(targets, MODEL, 1, 2, timeout=5.0, tls=tls, server_name=server_name))


def test_the_scrape_needs_the_admin_certificate(service: ServiceHandle, pki: DevPki) -> None:
    counters, problems = _scrape(service)  # plain HTTP to an HTTPS port
    assert not counters and "up-1" in problems
    assert f"127.0.0.1:{service.metrics_port}" in problems["up-1"] and "--metrics-ca" in problems["up-1"]

    counters, problems = _scrape(service, tls=scrape_tls(pki.ca.cert, None, None))  # HTTPS, no client certificate
    assert not counters and "up-1" in problems, problems

    counters, problems = _scrape(service, tls=scrape_tls(pki.ca.cert, pki.client.cert, pki.client.key))  # other CA
    assert not counters and "up-1" in problems, problems

    counters, problems = _scrape(service, tls=scrape_tls(pki.ca.cert, pki.admin.cert, pki.admin.key))
    assert problems == {}
    assert counters["up-1"]["versions"]["1"]["codes"] == {"OK": 1.0}
    assert service.process.alive()


def test_the_services_certificate_is_checked(service: ServiceHandle, pki: DevPki, tmp_path: Path) -> None:
    stranger = ensure_dev_pki(tmp_path / "stranger")
    counters, problems = _scrape(service, tls=scrape_tls(stranger.ca.cert, pki.admin.cert, pki.admin.key))
    assert not counters and "--metrics-ca" in problems["up-1"], problems  # not signed by that CA
    good = scrape_tls(pki.ca.cert, pki.admin.cert, pki.admin.key)
    counters, problems = _scrape(service, tls=good, server_name="sluice-elsewhere.example")
    assert not counters and "up-1" in problems, problems  # the certificate names localhost and 127.0.0.1
    counters, problems = _scrape(service, tls=good, server_name="localhost")
    assert problems == {} and "up-1" in counters


def _install(pair_cert: Path, pair_key: Path, cert: Path, key: Path) -> None:
    """Put a pair in place as cert-manager renews a mounted Secret: new files, renamed over the old."""
    for source, target in ((pair_cert, cert), (pair_key, key)):
        temporary = target.with_name(f".{target.name}.new")
        temporary.write_bytes(source.read_bytes())
        os.replace(temporary, target)


def test_a_renewed_scrape_certificate_is_used_without_a_restart(service: ServiceHandle, pki: DevPki,
                                                                 tmp_path: Path) -> None:
    stranger = ensure_dev_pki(tmp_path / "stranger")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(stranger.admin.cert, stranger.admin.key, cert, key)  # another admin CA's identity
    tls = ScrapeTls(pki.ca.cert, cert, key, interval=0)
    counters, problems = _scrape(service, tls=tls)
    assert not counters and "up-1" in problems, problems

    _install(pki.admin.cert, pki.admin.key, cert, key)  # renewed in place: the same object reads it
    counters, problems = _scrape(service, tls=tls)
    assert problems == {} and counters["up-1"]["versions"]["1"]["codes"] == {"OK": 1.0}

    _install(stranger.admin.cert, pki.admin.key, cert, key)  # a key of another certificate: refused
    counters, problems = _scrape(service, tls=tls)
    assert problems == {} and "up-1" in counters  # the previous pair stays in use


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says anything (a stalled handshake)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def test_a_silent_admin_port_is_a_problem_within_the_timeout(silent_port: int, pki: DevPki) -> None:
    targets = {"stalled": f"127.0.0.1:{silent_port}"}
    tls = scrape_tls(pki.ca.cert, pki.admin.cert, pki.admin.key)
    counters, problems = asyncio.run(scrape(targets, MODEL, 1, 2, timeout=0.5, tls=tls))
    assert not counters and "no answer within 0.5s" in problems["stalled"]


@pytest.fixture
def dripping_port() -> Iterator[tuple[int, list[int]]]:
    """A plain HTTP /metrics that answers its headers, then one body byte every 0.1 s (of 10,000):
    every read succeeds within a 0.2 s socket timeout. The list gets the bytes sent per connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()
    sent: list[int] = []

    def drip(connection: socket.socket) -> None:
        count = 0
        try:
            connection.recv(4096)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10000\r\n\r\n")
            while not stop.wait(0.1) and count < 10_000:
                connection.sendall(b"#")
                count += 1
        except OSError:
            pass
        finally:
            sent.append(count)
            connection.close()

    def accept() -> None:
        workers: list[threading.Thread] = []
        while not stop.is_set():
            try:
                connection = listener.accept()[0]
            except OSError:
                continue
            workers.append(threading.Thread(target=drip, args=(connection,), daemon=True))
            workers[-1].start()
        for worker in workers:
            worker.join()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1]), sent
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_dripping_admin_port_is_cut_off_at_the_total_bound(dripping_port: tuple[int, list[int]]) -> None:
    port, sent = dripping_port
    threads = threading.active_count()
    counters, problems = asyncio.run(scrape({"slow": f"127.0.0.1:{port}"}, MODEL, 1, 2, timeout=0.2))
    assert not counters and f"no answer within 0.2s (or {SCRAPE_TOTAL_TIMEOUTS * 0.2:g}s in all)" in problems["slow"]
    # The scrape's thread gave up (asyncio.run waited for it), not left reading in the pool; the
    # server saw the connection closed long before its body was out (0.8 s of drip, not 1,000 s).
    assert threading.active_count() <= threads + 1  # the server's drip thread may still be noticing
    sent_bytes = _wait_for_close(sent)
    assert sent_bytes < 100, sent_bytes


def _wait_for_close(sent: list[int]) -> int:
    """The bytes the drip sent, once it noticed the closed connection (its next send fails)."""
    done = threading.Event()
    while not sent and not done.wait(0.05):
        pass
    return sent[0]


@pytest.mark.parametrize(("fields", "message"), [
    ({"metrics_cert": "{admin.cert}", "metrics_key": "{admin.key}"}, "need --metrics-ca"),
    ({"metrics_ca": "{ca}", "metrics_cert": "{admin.cert}"}, "--metrics-cert and --metrics-key go together"),
    ({"metrics_ca": "{admin.key}"}, "--metrics-ca"),
    ({"metrics_ca": "{ca}", "metrics_cert": "{admin.cert}", "metrics_key": "{client.key}"}, "--metrics-key"),
    ({"metrics_server_name": "localhost"}, "--metrics-server-name needs --metrics-ca"),
])
def test_rollout_controller_refuses_unusable_scrape_files(pki: DevPki, fields: dict[str, str], message: str) -> None:
    paths = {"{ca}": pki.ca.cert, "{admin.cert}": pki.admin.cert, "{admin.key}": pki.admin.key,
             "{client.key}": pki.client.key}
    values: dict[str, Any] = {name: paths.get(value, value) for name, value in fields.items()}
    with pytest.raises(ValidationError) as refused:
        RolloutControllerSettings(**values)
    assert message in str(refused.value)
