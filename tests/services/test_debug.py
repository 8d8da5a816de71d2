"""The admin port's debug endpoints against a real service: a profile under load, a thread dump
with a stuck request, a memory diff over 20 loads and unloads, and where the endpoints answer."""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mesh.observability.admin import is_loopback
from protos.inference import grpc_service_pb2 as pb
from tests.fixtures.processes import wait_for
from tests.fixtures.service import ServiceHandle
from tests.services import models
from tests.services.clients import raw_request, stub_for, typed_request

pytestmark = pytest.mark.slow


def admin(service: ServiceHandle, path: str, *, method: str = "GET", timeout: float = 60.0) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{service.metrics_port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body = answer.read()
    return json.loads(body) if answer.headers.get("Content-Type") == "application/json" else body.decode()


def status_of(service: ServiceHandle, path: str, method: str = "GET") -> int:
    try:
        admin(service, path, method=method)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


LOAD_ERRORS: list[str] = []


def load(service: ServiceHandle, stop: threading.Event) -> None:
    """Typed-contents requests (decoded element by element) on the slow model, until ``stop``."""
    x = np.ones((16, 1), dtype=np.float32)
    big = np.ones((8, 50000), dtype=np.float32)
    with stub_for(service) as stub:
        while not stop.is_set():
            try:
                stub.ModelInfer(typed_request("slow", "x", "FP32", x), timeout=30)
                stub.ModelInfer(typed_request("identity", "x", "FP32", big), timeout=30)
            except grpc.RpcError as exc:
                LOAD_ERRORS.append(str(exc.details()))
                return


@pytest.fixture
def service(tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> ServiceHandle:
    repo = tmp_path / "repo"
    models.write_model(repo, "slow", models.slow(matmuls=20, size=256))
    models.write_model(repo, "identity", models.identity("FP32"))
    # No warm-up: one run of it takes minutes, which is what makes a request stuck.
    models.write_model(repo, "stuck", models.stuck(iterations=3000, size=1024), config={"warmup_runs": 0})
    return start_service(repo, "--repository-control", "--max-concurrency", "8", timeout=120.0)


@pytest.fixture
def under_load(service: ServiceHandle) -> Iterator[ServiceHandle]:
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(service, stop), daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        yield service
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


def test_profile_under_load_shows_handler_threads_in_onnx_runtime_and_decoding(under_load: ServiceHandle) -> None:
    document = admin(under_load, "/debug/profile?seconds=5&idle=0", timeout=60)
    frames = document["shared"]["frames"]
    handler_stacks = [[frames[i] for i in stack] for p in document["profiles"]
                      if p["name"].startswith("grpc-handler") for stack in p["samples"]]
    assert handler_stacks, (LOAD_ERRORS, [p["name"] for p in document["profiles"]])

    def seen(file_part: str, function: str | None = None) -> bool:
        return any(file_part in f["file"] and (function is None or f["name"] == function)
                   for stack in handler_stacks for f in stack)

    assert seen("services/model.py", "run"), "no handler thread in the frame calling ONNX Runtime's run()"
    assert seen("services/grpc/converters.py") or seen("services/datatypes.py"), "no request decoding"
    collapsed = admin(under_load, "/debug/profile?seconds=1&format=collapsed", timeout=30)
    assert any(line.startswith("grpc-handler") for line in collapsed.splitlines())


def test_a_second_profile_at_once_is_refused(service: ServiceHandle) -> None:
    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(status_of(service, "/debug/profile?seconds=3")))
    first.start()
    wait_for(lambda: "debug_profile" in service.process.log_text(), 20, "the first profile to start")
    assert status_of(service, "/debug/profile?seconds=1") == 409
    first.join(30)
    assert results == [200]


def test_thread_dump_shows_the_frame_of_a_stuck_request(service: ServiceHandle) -> None:
    with grpc.insecure_channel(service.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        x = np.ones((1, 1), dtype=np.float32)
        future = call.future(raw_request("stuck", {"x": ("FP32", x)}), timeout=120)
        try:
            def stuck_in_run() -> bool:
                dump = admin(service, "/debug/threads?format=json")
                return any(t["name"].startswith("grpc-handler") and
                           any(f["file"].endswith("services/model.py") and f["function"] == "run"
                               for f in t["frames"]) for t in dump["threads"])
            wait_for(stuck_in_run, 30, "a handler thread inside OnnxModel.run")
            text = admin(service, "/debug/threads")
            assert "Thread grpc-handler_" in text and "services/model.py:" in text
            assert "Thread MainThread" in text  # the event loop
        finally:
            future.cancel()
            # ONNX Runtime goes on with the run for minutes whatever the client does, so a graceful
            # stop would only wait for the fixture's SIGKILL: send it now.
            service.process.signal(signal.SIGKILL)


def test_memory_diff_after_loading_and_unloading_a_model_20_times(service: ServiceHandle) -> None:
    assert admin(service, "/debug/memory/tracing?on=1", method="POST")["tracing"] is True
    before = admin(service, "/debug/memory?top=10")
    assert before["component"]["loaded"] == 3
    with stub_for(service) as stub:
        for _ in range(20):
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="slow"), timeout=60)
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"), timeout=60)
    after = admin(service, f"/debug/memory?top=10&diff_from={before['id']}")
    diff = after["diff"]
    assert diff["from"] == before["id"] and diff["sites_compared"] is True
    assert after["component"]["loaded"] == 3
    assert {(v["model"], v["version"]) for v in after["component"]["versions"]} == \
        {(v["model"], v["version"]) for v in before["component"]["versions"]}
    assert all(":" in site["site"] for site in diff["top"])
    # Where memory went: 20 sessions of a 256x256 model would be >5 MiB of Python-visible buffers
    # if they stayed alive; what tracemalloc sees grow is far less.
    assert diff["traced_bytes"] < 5 * 1024 * 1024, diff["top"]
    assert isinstance(diff["rss_bytes"], int)
    assert admin(service, "/debug/memory/tracing?on=0", method="POST")["tracing"] is False


def test_metrics_still_answer_and_bad_debug_requests_are_refused(service: ServiceHandle) -> None:
    assert "sluice_loaded_versions" in service.metrics_text()
    assert status_of(service, "/debug/profile?seconds=61") == 400
    assert status_of(service, "/debug/profile?bogus=1") == 400
    assert status_of(service, "/debug/memory?diff_from=m999") == 404
    assert status_of(service, "/debug/memory/tracing?on=1") == 405  # GET
    assert status_of(service, "/debug/nothing") == 404


def own_non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            address = str(probe.getsockname()[0])
    except OSError:
        return None
    return None if is_loopback(address) else address


def test_admin_port_is_bound_to_loopback_by_default(service: ServiceHandle) -> None:
    address = own_non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    with pytest.raises(OSError), socket.create_connection((address, service.metrics_port), timeout=2):
        pass


def test_debug_off_and_auto_beyond_loopback(tmp_path: Path, start_service: Callable[..., ServiceHandle]) -> None:
    repo = tmp_path / "repo"
    models.write_model(repo, "identity", models.identity("FP32", ["batch", 1]))
    off = start_service(repo, "--debug-endpoints", "off")
    assert status_of(off, "/debug/threads") == 404
    assert "sluice_loaded_versions" in off.metrics_text()
    address = own_non_loopback_address()
    if address is None:
        return
    wide = start_service(repo, "--metrics-host", "0.0.0.0")
    for host, expected in ((address, 403), ("127.0.0.1", 200)):
        try:
            with urllib.request.urlopen(f"http://{host}:{wide.metrics_port}/debug/threads", timeout=10) as answer:
                code = answer.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code == expected, host
    # As Istio's sidecar delivers inbound mesh calls: from 127.0.0.6 to the pod's own address.
    assert _status_from("127.0.0.6", address, wide.metrics_port, "/debug/threads") == 403
    assert _status_from("127.0.0.6", "127.0.0.1", wide.metrics_port, "/debug/threads") == 200
    with urllib.request.urlopen(f"http://{address}:{wide.metrics_port}/metrics", timeout=10) as answer:
        assert b"sluice_loaded_versions" in answer.read()


def _status_from(source: str, host: str, port: int, path: str) -> int:
    """The HTTP status of one GET sent from the local address ``source``."""
    with socket.create_connection((host, port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])

