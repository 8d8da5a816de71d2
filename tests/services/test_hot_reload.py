"""Hot reload against the real service and real files, under continuous client load.

The model under test adds its version number to the input (``y = x + version``), so every answer
says which version computed it; the response's ``model_version`` must agree.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.fixtures.service import ServiceHandle

MODEL = "adder"
CLIENTS = 8
QUIET_MS = 100


def adder(version: int, *, variant: int = 0, input_name: str = "x") -> bytes:
    """``y = x + version`` over FP32 [batch, 4]; ``variant`` changes the bytes, not the maths."""
    add = numpy_helper.from_array(np.full((4,), float(version), dtype=np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", [input_name, "c"], ["y"])], f"adder_v{version}_{variant}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[add])
    model = helper.make_model(graph, producer_name=f"sluice-tests-{variant}",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def commit(repo: Path, version: int, data: bytes) -> None:
    """The recommended commit: write next to the repository, then rename into place."""
    staging = repo / f".staging-{version}-{time.monotonic_ns()}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(data)
    staging.rename(repo / MODEL / str(version))


def replace_in_place(repo: Path, version: int, data: bytes) -> None:
    """Replace a served version's file with an atomic file rename."""
    target = repo / MODEL / str(version) / "model.onnx"
    tmp = target.with_name(".model.onnx.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def slow_copy(repo: Path, version: int, data: bytes, pieces: int = 4, pause: float = 0.25) -> None:
    """A copy in progress straight into the repository (no rename), with pauses between writes."""
    folder = repo / MODEL / str(version)
    folder.mkdir()
    step = len(data) // pieces + 1
    with (folder / "model.onnx").open("wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            time.sleep(pause)


@dataclass
class LoadStats:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    versions_seen: set[int] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)


def run_clients(address: str, stop: threading.Event, stats: LoadStats, allowed: Callable[[], set[int]]
                ) -> list[threading.Thread]:
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with triton_grpc.InferenceServerClient(address) as triton:
            while not stop.is_set():
                x = rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)
                tensor = triton_grpc.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                valid_before = allowed()
                started = time.perf_counter()
                try:
                    result = triton.infer(MODEL, [tensor], client_timeout=10)
                except Exception as exc:  # every failure is a test failure
                    with lock:
                        stats.failures.append(str(exc))
                    continue
                elapsed = time.perf_counter() - started
                version = int(result.get_response().model_version)
                y = result.as_numpy("y")
                with lock:
                    stats.ok += 1
                    stats.latencies.append(elapsed)
                    stats.versions_seen.add(version)
                    if version not in valid_before | allowed() or not np.array_equal(y, x + np.float32(version)):
                        stats.wrong.append(f"answer from version {version}, valid: {sorted(valid_before)}")

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return threads


def index(handle: ServiceHandle) -> dict[int, tuple[str, str]]:
    with triton_grpc.InferenceServerClient(handle.address) as triton:
        rows = triton.get_model_repository_index(as_json=True).get("models", [])
    return {int(r["version"]): (r.get("state", ""), r.get("reason", "")) for r in rows
            if r["name"] == MODEL and r.get("version")}


@pytest.fixture
def adder_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / MODEL).mkdir(parents=True)
    (repo / MODEL / "config.yaml").write_text(yaml.safe_dump({"max_batch_size": 8}))
    commit(repo, 1, adder(1))
    return repo


@pytest.fixture
def adder_service(adder_repo: Path, start_service: Callable[..., ServiceHandle]) -> Iterator[ServiceHandle]:
    # Explicit load/unload is an admin surface, off by default: the unload tests turn it on.
    yield start_service(adder_repo, "--reload-quiet-ms", str(QUIET_MS), "--metrics-port", "0",
                        "--repository-control")


def wait_state(handle: ServiceHandle, version: int, state: str | None, timeout: float = 15.0) -> None:
    """Wait until ``version`` has ``state`` in RepositoryIndex (None: gone from the index)."""
    def check() -> bool:
        row = index(handle).get(version)
        return row is None if state is None else row is not None and row[0] == state
    handle.process.wait_until(check, timeout, f"version {version} -> {state}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_twenty_reload_cycles_under_load_lose_no_request(adder_repo: Path, adder_service: ServiceHandle) -> None:
    repo = adder_repo
    valid: set[int] = {1}
    valid_lock = threading.Lock()

    def allowed() -> set[int]:
        with valid_lock:
            return set(valid)

    def set_valid(*versions: int, remove: int | None = None) -> None:
        with valid_lock:
            valid.update(versions)
            if remove is not None:
                valid.discard(remove)

    stats = LoadStats()
    stop = threading.Event()
    threads = run_clients(adder_service.address, stop, stats, allowed)
    commit_to_ready: list[float] = []
    try:
        time.sleep(3.0)  # steady state first, to compare latency with what reloads cost
        steady_count = len(stats.latencies)
        newest = 1
        for cycle in range(20):
            # 1. a new compatible version, committed by rename
            new = newest + 1
            committed = time.perf_counter()
            commit(repo, new, adder(new))
            set_valid(new)
            wait_state(adder_service, new, "READY")
            commit_to_ready.append(time.perf_counter() - committed)
            # 2. the same version replaced in place by a new copy (same maths, other bytes)
            replace_in_place(repo, new, adder(new, variant=cycle + 1))
            # 3. broken candidates: garbage, truncated, incompatible signature, slow partial copy
            bad = new + 1
            kind = cycle % 4
            if kind == 0:
                commit(repo, bad, b"\x08\x07garbage that is not a model")
            elif kind == 1:
                data = adder(bad)
                commit(repo, bad, data[: len(data) // 2])
            elif kind == 2:
                commit(repo, bad, adder(bad, input_name="renamed"))
            if kind == 3:
                # The copy is slow but complete: pieces may be tried and fail; the end result serves.
                set_valid(bad)
                slow_copy(repo, bad, adder(bad))
                wait_state(adder_service, bad, "READY")
                newest = bad
            else:
                wait_state(adder_service, bad, "UNAVAILABLE")
                shutil.rmtree(repo / MODEL / str(bad))
                wait_state(adder_service, bad, None)
                newest = new
            # 4. retire the oldest version (only the two newest stay)
            oldest = min(allowed())
            if len(allowed()) > 2:
                shutil.rmtree(repo / MODEL / str(oldest))
                wait_state(adder_service, oldest, None)
                set_valid(remove=oldest)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    steady = sorted(stats.latencies[:steady_count])
    reloading = sorted(stats.latencies[steady_count:])

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(len(values) * q))] * 1000

    commit_to_ready.sort()
    print(f"\nreload under load: {stats.ok} requests, {len(stats.failures)} failed, versions answered "
          f"{sorted(stats.versions_seen)}; latency p50/p99 steady {pct(steady, 0.5):.2f}/{pct(steady, 0.99):.2f} ms, "
          f"during reloads {pct(reloading, 0.5):.2f}/{pct(reloading, 0.99):.2f} ms; commit->ready "
          f"median {commit_to_ready[len(commit_to_ready) // 2] * 1000:.0f} ms max "
          f"{commit_to_ready[-1] * 1000:.0f} ms")
    assert not stats.failures, stats.failures[:5]
    assert not stats.wrong, stats.wrong[:5]
    assert stats.ok > 200
    assert adder_service.process.alive()
    # Committed (rename) to serving is bounded by the quiet interval plus the load, not by polling.
    assert commit_to_ready[len(commit_to_ready) // 2] < 1.0 + 0.5


def test_incompatible_version_is_refused_with_reason(adder_repo: Path, adder_service: ServiceHandle) -> None:
    commit(adder_repo, 2, adder(2, input_name="renamed"))
    wait_state(adder_service, 2, "UNAVAILABLE")
    _state, reason = index(adder_service)[2]
    assert "input 'x' was removed" in reason and "new required input 'renamed'" in reason, reason
    with triton_grpc.InferenceServerClient(adder_service.address) as triton:
        assert triton.is_model_ready(MODEL, "1")
        assert not triton.is_model_ready(MODEL, "2")
        assert triton.get_model_metadata(MODEL).versions == ["1"]


def test_config_with_signature_warn_allows_it(adder_repo: Path, adder_service: ServiceHandle) -> None:
    (adder_repo / MODEL / "config.yaml").write_text(yaml.safe_dump({"on_signature_change": "warn"}))
    commit(adder_repo, 2, adder(2, input_name="renamed"))
    wait_state(adder_service, 2, "READY")


def test_broken_config_keeps_serving_and_reports(adder_repo: Path, adder_service: ServiceHandle) -> None:
    (adder_repo / MODEL / "config.yaml").write_text("max_batch_size: -3\n")
    commit(adder_repo, 2, adder(2))

    def reported() -> bool:
        with triton_grpc.InferenceServerClient(adder_service.address) as triton:
            rows = triton.get_model_repository_index(as_json=True)["models"]
        return any("max_batch_size" in r.get("reason", "") for r in rows)

    adder_service.process.wait_until(reported, 15, "config error in RepositoryIndex")
    with triton_grpc.InferenceServerClient(adder_service.address) as triton:
        assert triton.is_model_ready(MODEL, "1")
        assert triton.is_server_ready()
    # Fixing the file loads the waiting version.
    (adder_repo / MODEL / "config.yaml").write_text("max_batch_size: 8\n")
    wait_state(adder_service, 2, "READY")


def test_failed_version_is_retried_when_its_files_change(adder_repo: Path, adder_service: ServiceHandle) -> None:
    commit(adder_repo, 2, b"not yet a model")
    wait_state(adder_service, 2, "UNAVAILABLE")
    replace_in_place(adder_repo, 2, adder(2))
    wait_state(adder_service, 2, "READY")


def test_ready_marker_is_required_when_configured(adder_repo: Path, adder_service: ServiceHandle) -> None:
    (adder_repo / MODEL / "config.yaml").write_text(yaml.safe_dump({"require_ready_marker": True}))
    (adder_repo / MODEL / "1" / "READY").touch()
    folder = adder_repo / MODEL / "2"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(adder(2))
    time.sleep(1.0)
    assert 2 not in index(adder_service) or index(adder_service)[2][0] != "READY"
    (folder / "READY").touch()
    wait_state(adder_service, 2, "READY")


def test_explicit_unload_sticks_until_explicit_load(adder_repo: Path, adder_service: ServiceHandle) -> None:
    with triton_grpc.InferenceServerClient(adder_service.address) as triton:
        triton.unload_model(MODEL)
        assert not triton.is_model_ready(MODEL)
        commit(adder_repo, 2, adder(2))  # a file change does not undo an explicit unload
        time.sleep(1.0)
        assert not triton.is_model_ready(MODEL)
        triton.load_model(MODEL)
        assert triton.is_model_ready(MODEL, "1") and triton.is_model_ready(MODEL, "2")


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_is_returned_after_unload_cycles(tmp_path: Path, start_service: Callable[..., ServiceHandle]
                                                ) -> None:
    """RSS after 50 load/unload cycles stays within 10 % of the level after the first cycle."""
    from examples.build_models import build_heavy

    repo = tmp_path / "repo"
    build_heavy(repo)
    service = start_service(repo, "--metrics-port", "-1", "--repository-control")
    x = np.ones((4, 512), dtype=np.float32)
    with triton_grpc.InferenceServerClient(service.address) as triton:
        def cycle() -> None:
            triton.unload_model("heavy")
            triton.load_model("heavy")
            tensor = triton_grpc.InferInput("x", [4, 512], "FP32")
            tensor.set_data_from_numpy(x)
            triton.infer("heavy", [tensor])

        cycle()
        after_first = _rss_kib(service.process.pid)
        for _ in range(49):
            cycle()
        after_fifty = _rss_kib(service.process.pid)
    print(f"\nRSS after 1 cycle {after_first / 1024:.1f} MiB, after 50 cycles {after_fifty / 1024:.1f} MiB")
    assert after_fifty <= after_first * 1.10, (after_first, after_fifty)


def test_version_removed_while_clients_pin_it_drains(adder_repo: Path, adder_service: ServiceHandle) -> None:
    commit(adder_repo, 2, adder(2))
    wait_state(adder_service, 2, "READY")
    shutil.rmtree(adder_repo / MODEL / "2")
    wait_state(adder_service, 2, None)
    with triton_grpc.InferenceServerClient(adder_service.address) as triton:
        x = np.zeros((1, 4), dtype=np.float32)
        tensor = triton_grpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        assert int(triton.infer(MODEL, [tensor]).get_response().model_version) == 1
        with pytest.raises(Exception, match=r"NOT_FOUND|UNAVAILABLE"):
            triton.infer(MODEL, [tensor], model_version="2")

