"""``sluice debug`` against a real admin port (an AdminServer in this process) and a real etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mesh.devstack.pki import DevPki, ensure_dev_pki
from mesh.observability.admin import AdminServer
from mesh.observability.admin_tls import AdminTls
from mesh.ports import free_port
from tests.fixtures.etcd import EtcdServer


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "debug", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture
def admin_port() -> Iterator[int]:
    server = AdminServer(CollectorRegistry(), component="test")
    port = server.start("127.0.0.1", 0)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="parked-worker")
    worker.start()
    try:
        yield port
    finally:
        stop.set()
        worker.join(5)
        server.close()


def test_threads_profile_and_memory_by_address(admin_port: int, tmp_path: Path) -> None:
    address = f"127.0.0.1:{admin_port}"
    threads = sluice("threads", address)
    assert threads.returncode == 0, threads.stderr
    assert "Thread parked-worker" in threads.stdout

    out = tmp_path / "p.speedscope.json"
    profile = sluice("profile", address, "--seconds", "1", "-o", str(out))
    assert profile.returncode == 0, profile.stderr
    assert "profiling 127.0.0.1" in profile.stderr and f"wrote {out}" in profile.stderr
    assert "parked-worker" in {p["name"] for p in json.loads(out.read_text())["profiles"]}

    first = sluice("memory", address, "--trace", "on")
    assert first.returncode == 0, first.stderr
    assert "tracemalloc on" in first.stderr and "tracemalloc: on" in first.stdout
    snapshot_id = first.stdout.split()[1]
    second = sluice("memory", address, "--diff-from", snapshot_id, "-o", str(tmp_path / "m.json"), "--trace", "off")
    assert second.returncode == 0, second.stderr
    assert f"since {snapshot_id}" in second.stdout
    assert json.loads((tmp_path / "m.json").read_text())["diff"]["from"] == snapshot_id


def test_unreachable_and_refused_requests_are_one_line_errors(admin_port: int) -> None:
    refused = sluice("threads", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 1 and "cannot reach the admin port" in refused.stderr
    assert "Traceback" not in refused.stderr
    unknown = sluice("memory", f"127.0.0.1:{admin_port}", "--diff-from", "m77")
    assert unknown.returncode == 1 and "answered 404: no snapshot m77" in unknown.stderr
    too_long = sluice("profile", f"127.0.0.1:{admin_port}", "--seconds", "100")
    assert too_long.returncode == 1 and "--seconds" in too_long.stderr


def test_an_instance_id_not_in_etcd_is_named(etcd: EtcdServer) -> None:
    result = sluice("threads", "no-such-instance", "--etcd", etcd.endpoint, "--prefix", "/h3-debug-test/")
    assert result.returncode == 1
    assert "no instance 'no-such-instance' is registered in etcd" in result.stderr


@pytest.fixture
def tls_admin_port(tmp_path: Path) -> Iterator[tuple[int, DevPki]]:
    pki = ensure_dev_pki(tmp_path / "pki")
    server = AdminServer(CollectorRegistry(), component="test",
                         tls=AdminTls(pki.service.cert, pki.service.key, pki.admin_ca.cert))
    port = server.start("127.0.0.1", 0)
    try:
        yield port, pki
    finally:
        server.close()


def test_the_admin_identity_from_the_environment_and_the_name_checked(tls_admin_port: tuple[int, DevPki]) -> None:
    port, pki = tls_admin_port
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    admin = {**env, "SLUICE_ADMIN_CA": str(pki.ca.cert), "SLUICE_ADMIN_CERT": str(pki.admin.cert),
             "SLUICE_ADMIN_KEY": str(pki.admin.key)}

    def debug(*args: str, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mesh.cli", "debug", *args], capture_output=True, text=True,
                              timeout=60, check=False, env=environment)

    done = debug("threads", f"127.0.0.1:{port}", environment=admin)
    assert done.returncode == 0 and "Thread MainThread" in done.stdout, done.stderr
    # The certificate names localhost and 127.0.0.1 (a pod's names its Service instead: --admin-server-name).
    done = debug("threads", f"127.0.0.1:{port}", "--admin-server-name", "localhost", environment=admin)
    assert done.returncode == 0, done.stderr
    done = debug("threads", f"127.0.0.1:{port}", environment={**admin, "SLUICE_ADMIN_SERVER_NAME": "elsewhere.example"})
    assert done.returncode == 1 and "does not name 'elsewhere.example'" in done.stderr, done.stderr
    assert "--admin-server-name" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # The flags beat the environment: another CA's client certificate is refused.
    done = debug("threads", f"127.0.0.1:{port}", "--admin-cert", str(pki.client.cert), "--admin-key",
                 str(pki.client.key), environment=admin)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    done = debug("threads", f"127.0.0.1:{port}", "--admin-server-name", "localhost", environment=env)
    assert done.returncode == 1 and "--admin-server-name needs HTTPS" in done.stderr, done.stderr
