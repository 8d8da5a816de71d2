"""A rollout under load: real etcd, a real registered service serving versions 2 and 3 of ``dbl``,
the real ``sluice rollout-controller`` and a load of real gRPC clients that split their requests
by the weights in etcd, as the gateway would."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest

from mesh.ports import free_port
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.processes import ManagedProcess, wait_for
from tests.fixtures.service import ServiceHandle, sluice_argv
from tests.services import models
from tests.services.clients import RPC_TIMEOUT_S, raw_request, stub_for

MODEL = "dbl"


@dataclass
class Stack:
    etcd: EtcdServer
    prefix: str
    service: ServiceHandle
    start_controller: Callable[[str], ManagedProcess]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "mesh.cli", *args, "--etcd", self.etcd.endpoint, "--prefix", self.prefix]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(args)}: exit {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def get(self, what: str) -> Any:
        out = self.etcd.etcdctl("get", f"{self.prefix}models/{MODEL}/{what}", "--print-value-only").stdout.strip()
        return json.loads(out) if out else None

    def rollout(self) -> dict[str, Any]:
        doc = self.get("rollout")
        assert doc is not None
        return dict(doc)

    def weights(self) -> dict[str, int]:
        routing = self.get("routing")
        return dict(routing["weights"]) if routing else {}

    def wait_rollout(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        doc = self.rollout()
        while not predicate(doc):
            if time.monotonic() > deadline:
                doc["state"].pop("window_start", None)
                shown = json.dumps(doc)[-3000:]
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; the rollout: {shown}")
            time.sleep(0.2)
            doc = self.rollout()
        return doc


@dataclass
class Load:
    """Real gRPC clients: each request pinned to a version drawn by the weights in etcd."""

    stack: Stack
    values: Callable[[random.Random], float] = lambda rng: float(rng.randrange(0, models.ROLLOUT_TABLE_SIZE))
    sent: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    seen: list[dict[str, int]] = field(default_factory=list)
    """Every routing the clients followed, in order (each distinct one once)."""
    _weights: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._weights = self.stack.weights()
        self._threads = [threading.Thread(target=self._follow, daemon=True),
                         threading.Thread(target=self._send, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _follow(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._weights = self.stack.weights()
            except (subprocess.SubprocessError, ValueError):
                continue
            if not self.seen or self.seen[-1] != self._weights:
                self.seen.append(self._weights)

    def _send(self) -> None:
        rng = random.Random(7)
        with stub_for(self.stack.service) as stub:
            while not self._stop.is_set():
                weights = {v: w for v, w in self._weights.items() if w > 0} or {"2": 1}
                version = rng.choices(list(weights), list(weights.values()))[0]
                x = np.array([[self.values(rng)]], dtype=np.float32)
                try:
                    stub.ModelInfer(raw_request(MODEL, {"x": ("FP32", x)}, version=version,
                                                request_id=f"r{sum(self.sent.values())}"), timeout=RPC_TIMEOUT_S)
                except grpc.RpcError as exc:
                    self.failures[f"{version}:{exc.code().name}"] += 1
                self.sent[version] += 1


@pytest.fixture
def make_stack(tmp_path: Path, shared_etcd: EtcdServer, etcd_prefix: str,
               process_factory: Callable[..., ManagedProcess]) -> Iterator[Callable[..., Stack]]:
    def make(candidate: onnx.ModelProto, *, third: bool = False, controller_flags: tuple[str, ...] = ()) -> Stack:
        """``third``: version 1 serves too (the same doubler), weighted as the test sets."""
        repo = tmp_path / "repo"
        if third:
            models.write_model(repo, MODEL, models.doubler(), version=1)
        models.write_model(repo, MODEL, models.doubler(), version=2)
        models.write_model(repo, MODEL, candidate, version=3)
        port, metrics_port = free_port(), free_port()
        argv = sluice_argv("serve", "--repo", str(repo), "--port", str(port), "--metrics-port", str(metrics_port),
                           "--rest-port", "-1", "--log-format", "json", "--etcd", shared_etcd.endpoint,
                           "--prefix", etcd_prefix,
                           "--lease-ttl", "3", "--instance-id", "svc-a", "--deregister-grace", "0.2")
        service = ServiceHandle(process_factory("sluice-serve", argv), port, metrics_port, repo)
        service.process.wait_until(service.ready, 60, "ServerReady")

        def start_controller(name: str) -> ManagedProcess:
            return process_factory(name, sluice_argv(
                "rollout-controller", "--etcd", shared_etcd.endpoint, "--prefix", etcd_prefix, "--tick", "0.2",
                "--leader-ttl", "2", "--identity", name, "--log-format", "json", *controller_flags))

        stack = Stack(shared_etcd, etcd_prefix, service, start_controller)

        def registered() -> bool:  # one `sluice status` per look: each is a Python start-up
            status = stack.cli("status", MODEL, "-o", "json", check=False)
            return (status.returncode == 0 and '"instance_id": "svc-a"' in status.stdout
                    and status.stdout.count('"state": "serving"') >= 2 + third)

        wait_for(registered, 30, "both versions registered", interval=0.3)
        stack.cli("weights", "set", MODEL, "2=100")
        return stack

    yield make


@contextlib.contextmanager
def load_on(stack: Stack, **kwargs: Any) -> Iterator[Load]:
    load = Load(stack, **kwargs).start()
    try:
        yield load
    finally:
        load.stop()


def wait_phase(stack: Stack, phase: str, timeout: float) -> dict[str, Any]:
    return stack.wait_rollout(lambda d: d["state"]["phase"] == phase, timeout, f"rollout {phase}")
