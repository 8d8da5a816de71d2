"""The README tour, end to end: `sluice up` as a process, then the same commands a user types."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from examples.build_models import build_iris
from tests.fixtures.processes import ManagedProcess, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sluice(*args: str, env: dict[str, str], timeout: float = 60) -> str:
    result = subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **env}, check=False)
    assert result.returncode == 0, f"sluice {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (read from /proc, so no extra dependency)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def call(gateway: str, version: str = "") -> int:
    """One iris request through Envoy; returns the version that answered."""
    headers = {"x-model-name": "iris"} | ({"x-model-version": version} if version else {})
    with triton_grpc.InferenceServerClient(gateway) as client:
        x = triton_grpc.InferInput("input", [1, 4], "FP32")
        x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        result = client.infer("iris", [x], headers=headers, client_timeout=10)
        assert result.as_numpy("label").tolist() == [0]
        return int(result.get_response().model_version)


def instances(env: dict[str, str]) -> dict[int, int]:
    """Version of iris -> registered instances, from `sluice status -o json`."""
    report = json.loads(sluice("status", "iris", "-o", "json", env=env))
    (model,) = report["models"]
    return {v["version"]: len(v["instances"]) for v in model["versions"] if v["instances"]}


def versions_of(gateway: str, n: int) -> Counter[int]:
    return Counter(call(gateway) for _ in range(n))


@pytest.mark.timeout(300)
def test_readme_tour(tmp_path: Path, process_factory: Callable[..., ManagedProcess]) -> None:
    repo = tmp_path / "models"
    build_iris(repo)
    run_dir = tmp_path / "run"
    up = process_factory("sluice-up", [sys.executable, "-m", "mesh.cli", "up", "--repo", str(repo),
                                       "--services", "2", "--run-dir", str(run_dir)], cwd=tmp_path)
    up.wait_until(lambda: "Press Ctrl-C" in up.log_text(), 150, "sluice up to report the stack up")
    summary = up.log_text()
    assert "iris" in summary and "service-2" in summary and "Gateway:" in summary

    # A second `sluice up` on the same run directory says so instead of starting another stack.
    second = subprocess.run([sys.executable, "-m", "mesh.cli", "up", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 1 and "already running" in second.stdout

    env_text = sluice("env", "--run-dir", str(run_dir), env={})
    env = {}
    for line in env_text.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    gateway = env["SLUICE_GATEWAY"]
    assert call(gateway) == 2  # no routing document: the newest version

    # Canary: everything on 2, drop version 3 in by rename, then 10 % to it.
    sluice("weights", "set", "iris", "2=100", env=env)
    staging = repo / ".iris-3"
    shutil.copytree(repo / "iris" / "2", staging)
    staging.rename(repo / "iris" / "3")

    wait_for(lambda: instances(env) == {1: 2, 2: 2, 3: 2}, 30, "version 3 registered by both services")
    assert set(versions_of(gateway, 20)) == {2}
    applied = sluice("weights", "set", "iris", "2=50", "3=50", "--wait", "10", env=env)
    assert "applied by the gateway within" in applied, applied
    wait_for(lambda: set(versions_of(gateway, 20)) == {2, 3}, 20, "the split to include version 3")
    assert call(gateway, version="3") == 3  # pinned
    # Roll back.
    sluice("weights", "set", "iris", "2=100", env=env)
    wait_for(lambda: set(versions_of(gateway, 20)) == {2}, 20, "the rollback to reach Envoy")
    shutil.rmtree(repo / "iris" / "3")
    wait_for(lambda: instances(env) == {1: 2, 2: 2}, 30, "version 3 deregistered")
    scraped = ""
    for url in env["SLUICE_METRICS"].split():
        with urllib.request.urlopen(url, timeout=10) as response:
            scraped += response.read().decode()
    assert 'sluice_requests_total{code="OK",model="iris",version="2"}' in scraped

    # Every request left a trace: Envoy's span, the service's, the queue and the ONNX Runtime call.
    def traced() -> bool:
        shown = subprocess.run([sys.executable, "-m", "mesh.cli", "traces", "--last", "1", "--run-dir", str(run_dir)],
                               capture_output=True, text=True, timeout=30, check=False).stdout
        return all(part in shown for part in ("sluice-gateway", "ModelInfer", "sluice.queue", "onnxruntime.run"))
    wait_for(traced, 15, "a whole trace in `sluice traces`")

    # Ctrl-C stops everything, in order, and leaves no process behind.
    children = descendants(up.pid)
    assert len(children) >= 4, children  # etcd, 2 services, gateway (+ Envoy)
    up.signal(signal.SIGINT)
    assert up.proc.wait(timeout=90) == 0, up.log_text()[-3000:]
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "every child process to exit")
    log = up.log_text()
    assert log.index("stopping gateway") < log.index("stopping service-1") < log.index("stopping etcd")
