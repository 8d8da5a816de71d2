"""``sluice models | status | weights`` as an operator runs them: a subprocess against a real etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mesh.ports import free_port
from mesh.registry.records import InstanceRecord
from tests.fixtures.etcd import EtcdServer

ROOT = Path(__file__).resolve().parents[3]


def sluice(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**clean, **(env or {})}, check=False)


@pytest.fixture
def flags(shared_etcd: EtcdServer, etcd_prefix: str) -> list[str]:
    record = InstanceRecord(address="127.0.0.1:8001", model="iris", version=1, instance_id="pod-a",
                            started=time.time() - 120)
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/instances/1/pod-a", record.to_json().decode())
    return ["--etcd", shared_etcd.endpoint, "--prefix", etcd_prefix]


def test_models_and_status_tables(flags: list[str]) -> None:
    models = sluice("models", *flags)
    assert models.returncode == 0, models.stderr
    assert models.stdout.split("\n")[1].split() == ["iris", "1", "1", "no"]
    status = sluice("status", *flags)
    assert status.returncode == 0, status.stderr
    header, row = status.stdout.splitlines()[:2]
    assert header.split()[:3] == ["MODEL", "VERSION", "INSTANCES"]
    assert "iris" in row and "127.0.0.1:8001 serving 2m" in row
    assert "all traffic to the newest serving version" in status.stdout


def test_weights_set_get_promote(flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    changed = sluice("weights", "set", "iris", "1=90", "2=10", *flags)
    assert changed.returncode == 0, changed.stderr
    assert "iris: (no routing document) → 1=90 2=10" in changed.stdout
    assert "version 2 has weight 10 but no serving instances" in changed.stderr

    got = sluice("weights", "get", "iris", "-o", "json", *flags)
    assert got.returncode == 0, got.stderr
    data = json.loads(got.stdout)
    assert data["routing"] == {"weights": {"1": 90, "2": 10}} and data["revision"] > 0

    # What operators would see with etcdctl is the same document.
    raw = shared_etcd.etcdctl("get", "--print-value-only", f"{etcd_prefix}models/iris/routing").stdout
    assert json.loads(raw) == {"weights": {"1": 90, "2": 10}}

    promoted = sluice("weights", "promote", "iris", "1", *flags)
    assert promoted.returncode == 0, promoted.stderr
    assert "1=90 2=10 → 1=100" in promoted.stdout

    status = sluice("status", "iris", "-o", "yaml", *flags)
    report = yaml.safe_load(status.stdout)["models"][0]
    assert report["routing"] == {"weights": {"1": 100}}
    assert report["versions"][0]["weight"] == 100
    assert report["versions"][0]["instances"][0]["address"] == "127.0.0.1:8001"


def test_effective_weights_and_errors_come_from_the_status_document(flags: list[str], shared_etcd: EtcdServer,
                                                                    etcd_prefix: str) -> None:
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/status",
                        json.dumps({"effective_weights": {"1": 100}, "applied_revision": 5,
                                    "errors": ["routing: invalid routing document: weights must sum to > 0"]}))
    status = sluice("status", *flags)
    row = status.stdout.splitlines()[1]
    assert " 100 " in row and "weights must sum to > 0" in row


@pytest.mark.parametrize(("args", "message"), [
    (["1=90", "x=10"], "weights: version 'x' is not a positive integer"),
    (["1=0"], "weights must sum to > 0"),
    (["1=abc"], "weight of version '1' must be an integer"),
    (["90"], "expected VERSION=WEIGHT"),
])
def test_invalid_weights_exit_1_with_one_line(flags: list[str], args: list[str], message: str) -> None:
    result = sluice("weights", "set", "iris", *args, *flags)
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_compare_and_swap_conflict(flags: list[str]) -> None:
    first = sluice("weights", "set", "iris", "1=100", "--if-revision", "0", *flags)
    assert first.returncode == 0, first.stderr
    again = sluice("weights", "set", "iris", "1=50", "2=50", "--if-revision", "0", *flags)
    assert again.returncode == 1
    assert "not the expected 0" in again.stderr


def test_invalid_stored_document(flags: list[str], shared_etcd: EtcdServer, etcd_prefix: str) -> None:
    shared_etcd.etcdctl("put", f"{etcd_prefix}models/iris/routing", '{"weights": {"1": 10}, "wieghts": 1}')
    got = sluice("weights", "get", "iris", *flags)
    assert got.returncode == 1 and "unknown field 'wieghts'" in got.stderr
    status = sluice("status", *flags)
    assert status.returncode == 0 and "the gateway keeps the last good routing" in status.stdout


def test_unreachable_etcd_is_a_quick_clear_failure() -> None:
    start = time.monotonic()
    result = sluice("status", "--etcd", f"127.0.0.1:{free_port()}", "--connect-timeout", "2", timeout=20)
    assert result.returncode == 1
    assert result.stderr.startswith("sluice: error: etcd at 127.0.0.1:") and "unreachable" in result.stderr
    assert time.monotonic() - start < 15


def test_environment_configures_the_connection(shared_etcd: EtcdServer, etcd_prefix: str, flags: list[str]) -> None:
    env = {"SLUICE_ETCD_ENDPOINTS": shared_etcd.endpoint, "SLUICE_ETCD_PREFIX": etcd_prefix}
    result = sluice("models", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr
    assert [m["model"] for m in json.loads(result.stdout)["models"]] == ["iris"]
    bad = sluice("models", env={"SLUICE_ETCD_ENDPOINTS": "no-port"})
    assert bad.returncode == 1 and "invalid etcd settings" in bad.stderr
