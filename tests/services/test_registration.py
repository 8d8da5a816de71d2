"""Services register what they serve in a real etcd; leases, SIGKILL, SIGTERM and etcd outages."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from examples.build_models import build_iris
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle

TTL = 3


def instances(etcd: EtcdServer, prefix: str = "/sluice/") -> dict[str, dict[str, object]]:
    """key -> record, read with etcdctl as an operator would."""
    out = etcd.etcdctl("get", f"{prefix}models/", "--prefix", "-w", "json").stdout
    kvs = json.loads(out).get("kvs", [])
    import base64

    records = {}
    for kv in kvs:
        key = base64.b64decode(kv["key"]).decode()
        if "/instances/" in key:
            records[key] = json.loads(base64.b64decode(kv["value"]))
    return records


def start_registered(start_service: Callable[..., ServiceHandle], repo: Path, etcd: EtcdServer, name: str,
                     *extra: str) -> ServiceHandle:
    return start_service(repo, "--etcd", etcd.endpoint, "--lease-ttl", str(TTL), "--instance-id", name,
                         "--deregister-grace", "0.2", *extra)


@pytest.fixture
def two_repos(tmp_path: Path) -> tuple[Path, Path]:
    """Service a serves iris 1 and 2; service b serves only iris 2 (overlapping versions)."""
    a, b = tmp_path / "a", tmp_path / "b"
    build_iris(a)
    build_iris(b)
    import shutil

    shutil.rmtree(b / "iris" / "1")
    return a, b


def test_two_services_register_and_leave(two_repos: tuple[Path, Path], etcd: EtcdServer,
                                         start_service: Callable[..., ServiceHandle]) -> None:
    a = start_registered(start_service, two_repos[0], etcd, "svc-a")
    b = start_registered(start_service, two_repos[1], etcd, "svc-b")
    expected = {"/sluice/models/iris/instances/1/svc-a", "/sluice/models/iris/instances/2/svc-a",
                "/sluice/models/iris/instances/2/svc-b"}
    wait_for(lambda: set(instances(etcd)) == expected, 10, "both services registered")
    record = instances(etcd)["/sluice/models/iris/instances/2/svc-b"]
    assert record["address"] == b.address and record["state"] == "serving" and len(str(record["sha256"])) == 64
    # The CLI shows both instances of version 2.
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "iris", "--etcd", etcd.endpoint],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert a.address in shown and b.address in shown, shown

    # SIGKILL: nothing deregisters, the lease expires within its TTL.
    b.process.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: "/sluice/models/iris/instances/2/svc-b" not in instances(etcd), TTL + 3, "lease expiry")
    assert time.monotonic() - killed <= TTL + 1.5
    # SIGTERM: deregistered at once (before draining), the process exits cleanly.
    a.process.signal(signal.SIGTERM)
    termed = time.monotonic()
    wait_for(lambda: not instances(etcd), 3, "deregistration on SIGTERM")
    assert time.monotonic() - termed < 1.5
    assert a.process.proc.wait(timeout=15) == 0


def test_removed_version_is_deregistered_before_it_drains(two_repos: tuple[Path, Path], etcd: EtcdServer,
                                                          start_service: Callable[..., ServiceHandle]) -> None:
    import shutil

    start_registered(start_service, two_repos[0], etcd, "svc-a", "--reload-quiet-ms", "50")
    wait_for(lambda: len(instances(etcd)) == 2, 10, "registration")
    shutil.rmtree(two_repos[0] / "iris" / "1")
    wait_for(lambda: set(instances(etcd)) == {"/sluice/models/iris/instances/2/svc-a"}, 10, "deregistration")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_etcd_outage_loses_no_request_and_heals(two_repos: tuple[Path, Path], etcd: EtcdServer,
                                                start_service: Callable[..., ServiceHandle]) -> None:
    service = start_registered(start_service, two_repos[0], etcd, "svc-a")
    wait_for(lambda: len(instances(etcd)) == 2, 10, "registration")
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal done
        x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        with triton_grpc.InferenceServerClient(service.address) as triton:
            while not stop.is_set():
                tensor = triton_grpc.InferInput("input", [1, 4], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    triton.infer("iris", [tensor], client_timeout=5)
                    done += 1
                except Exception as exc:  # every failure counts
                    failures.append(str(exc))
                time.sleep(0.01)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        etcd.stop()
        outage_requests = done
        time.sleep(30)
        outage_requests = done - outage_requests
        etcd.start()
        back = time.monotonic()
        expected = {"/sluice/models/iris/instances/1/svc-a", "/sluice/models/iris/instances/2/svc-a"}
        wait_for(lambda: set(instances(etcd)) == expected, TTL + 10, "re-registration after the outage")
        print(f"\netcd outage: {outage_requests} requests served during 30 s without etcd, "
              f"re-registered {time.monotonic() - back:.1f} s after etcd returned")
        # No stale entries: exactly one lease holds them, and nothing else is there.
        time.sleep(TTL + 1)
        assert set(instances(etcd)) == expected
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert not failures, failures[:5]
    assert outage_requests > 100
    assert service.process.alive()


@pytest.mark.timeout(120)
def test_bad_models_are_refused_alone_and_the_good_one_registers(tmp_path: Path, etcd: EtcdServer,
                                                                start_service: Callable[..., ServiceHandle]
                                                                ) -> None:
    """A folder whose name etcd keys cannot hold, a label etcd would refuse, and labels that make
    the instance record too large: each fails to load on its own; the process stays up and the
    good model registers."""
    import shutil

    from mesh.protocol import MODEL_NAME_RULE
    from mesh.registry.records import INSTANCE_RECORD_MAX
    from services.config import LABEL_VALUE_MAX
    from tests.services import models

    repo = tmp_path / "repo"
    build_iris(repo)
    shutil.copytree(repo / "iris", repo / "iris-")
    models.write_model(repo, "huge_label", models.identity("FP32"), config={"labels": {"note": "n" * (2 << 20)}})
    many = {f"k{i}": "v" * LABEL_VALUE_MAX for i in range(INSTANCE_RECORD_MAX // LABEL_VALUE_MAX + 1)}
    models.write_model(repo, "many_labels", models.identity("FP32"), config={"labels": many})
    service = start_registered(start_service, repo, etcd, "svc-a")
    expected = {"/sluice/models/iris/instances/1/svc-a", "/sluice/models/iris/instances/2/svc-a"}
    failed = "/sluice/models/many_labels/instances/1/svc-a"  # registered as failed, without its labels

    def serving() -> set[str]:
        return {key for key, record in instances(etcd).items() if record["state"] == "serving"}

    wait_for(lambda: serving() == expected and failed in instances(etcd), 10, "the good model registered")
    assert "cannot be registered" in str(instances(etcd)[failed]["error"])
    with triton_grpc.InferenceServerClient(service.address) as triton:
        rows = {(r["name"], r.get("version", "")): r for r in
                triton.get_model_repository_index(as_json=True)["models"]}
    assert rows[("iris-", "")]["reason"] == f"folder 'iris-' is not a valid model name: use {MODEL_NAME_RULE}"
    assert "huge_label/config.yaml: " in rows[("huge_label", "")]["reason"]
    assert "larger than 262144 bytes" in rows[("huge_label", "")]["reason"]
    reason = rows[("many_labels", "1")]["reason"]
    assert rows[("many_labels", "1")]["state"] == "UNAVAILABLE"
    assert "many_labels/1/model.onnx: cannot be registered: its etcd instance record would be" in reason
    assert f"more than {INSTANCE_RECORD_MAX}" in reason
    time.sleep(1.0)  # nothing else shows up late, and nothing brought the process down
    assert set(instances(etcd)) == {*expected, failed}
    assert service.process.alive()
    assert "etcd_unavailable" not in service.process.log_text()
