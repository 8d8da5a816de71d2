"""Security posture of a real `sluice up`, plain and `--secure` (issue #16, item 6; #18's leftover).

* no process of the stack listens beyond loopback (read from /proc/net/tcp{,6} for its pids);
* the gateway port never serves Envoy admin, the services' /metrics and /debug/, or the OTLP
  receiver, whatever the path, method or token;
* no log file under the run directory and no error message holds a token, valid or not;
* the secure stack works as a client sees it: TLS checked against SLUICE_CA, `sluice token`,
  refusals with the right code, services that refuse a caller without a client certificate.

Each stack is one `sluice up` process (its etcd, one service, the gateway, Envoy, the rollout
controller), started once per module and stopped at its end.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shlex
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from examples.build_models import build_iris
from mesh.devstack import tokens
from mesh.devstack.pki import ensure_dev_pki, load_signing_key
from mesh.devstack.stack import find_etcd
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.processes import ManagedProcess, wait_for
from tests.mesh.devstack.test_command import descendants

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SLUICE = [sys.executable, "-m", "mesh.cli"]
ROOT = Path(__file__).resolve().parents[3]
CALL_TIMEOUT = 10.0
IRIS_ROW = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
REST_BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                    "data": IRIS_ROW.ravel().tolist()}]}).encode()


@dataclass
class Stack:
    """One running `sluice up` as a test sees it."""

    secure: bool
    run_dir: Path
    up: ManagedProcess
    env: dict[str, str] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.env["SLUICE_GATEWAY"]

    @property
    def ca(self) -> Path | None:
        return Path(self.env["SLUICE_CA"]) if "SLUICE_CA" in self.env else None

    def token(self, models: tuple[str, ...] = ("iris",), **kwargs: Any) -> str:
        """A token signed with the stack's key (a secure stack's; a plain one has a key made for the test)."""
        key = load_signing_key(self.run_dir / "pki" / "jwt.key") if self.secure else _test_key(self.run_dir)
        return tokens.mint(key, subject="posture-test", models=models, **kwargs)

    def channel(self) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(self.gateway)
        return grpc.secure_channel(self.gateway, grpc.ssl_channel_credentials(self.ca.read_bytes()))

    def http(self) -> http.client.HTTPConnection:
        host, _, port = self.gateway.rpartition(":")
        if self.ca is None:
            return http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT)
        return http.client.HTTPSConnection(host, int(port), timeout=CALL_TIMEOUT,
                                           context=ssl.create_default_context(cafile=str(self.ca)))

    def pids(self) -> set[int]:
        return {self.up.pid} | descendants(self.up.pid)


def _test_key(run_dir: Path) -> ec.EllipticCurvePrivateKey:
    """For the plain stack: a key of the test's own (the stack ignores tokens; they must not leak either)."""
    return load_signing_key(ensure_dev_pki(run_dir.parent / "test-pki").jwt_key)


def sluice(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*SLUICE, *args], capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert result.returncode == 0, f"sluice {shlex.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        if name != "PATH":
            env[name] = shlex.split(value)[0] if value else ""
    return env


@contextlib.contextmanager
def running_stack(base: Path, *, secure: bool) -> Iterator[Stack]:
    repo, run_dir = base / "models", base / "run"
    build_iris(repo)
    argv = [*SLUICE, "up", "--repo", str(repo), "--services", "1", "--run-dir", str(run_dir)]
    up = ManagedProcess("sluice-up", [*argv, "--secure"] if secure else argv, base / "up.log", cwd=base)
    try:
        up.wait_until(lambda: "Press Ctrl-C" in up.log_text(), 180, "the stack up")
        stack = Stack(secure, run_dir, up, parse_env(sluice("env", "--run-dir", str(run_dir)).stdout))
        yield stack
    finally:
        up.stop(timeout=60)


@pytest.fixture(scope="module")
def plain_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("plain"), secure=False) as stack:
        yield stack


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("secure"), secure=True) as stack:
        yield stack


@pytest.fixture(params=["plain", "secure"])
def stack(request: pytest.FixtureRequest) -> Stack:
    return request.getfixturevalue(f"{request.param}_stack")  # type: ignore[no-any-return]


# -- calls ------------------------------------------------------------------------------------
def infer(stack: Stack, token: str | None, model: str = "iris") -> pb.ModelInferResponse:
    metadata = [("x-model-name", model)] + ([("authorization", f"Bearer {token}")] if token is not None else [])
    request = pb.ModelInferRequest(
        model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 4])],
        raw_input_contents=[IRIS_ROW.tobytes()])
    with stack.channel() as channel:
        response: pb.ModelInferResponse = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=metadata, timeout=CALL_TIMEOUT)
        return response


def infer_error(stack: Stack, token: str | None, model: str = "iris") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        infer(stack, token, model)
    return failed.value


def rest(stack: Stack, method: str, path: str, token: str | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {token}"} if token else {})
    connection = stack.http()
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# -- listeners --------------------------------------------------------------------------------
def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(ordered)


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and inode in owner:
                address, _, port = local.partition(":")
                found.append((owner[inode], str(_address(address)), int(port, 16)))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_no_process_of_the_stack_listens_beyond_loopback(stack: Stack) -> None:
    pids = stack.pids()
    assert len(pids) >= 6, pids  # sluice up, etcd, a service, the gateway, Envoy, the rollout controller
    found = listeners(pids)
    ports = {port for _, _, port in found}
    # Not vacuous: the gateway, etcd, the service's ports and the trace receiver are all seen.
    assert int(stack.gateway.rpartition(":")[2]) in ports
    assert int(stack.env["SLUICE_ETCD_ENDPOINTS"].rpartition(":")[2]) in ports
    assert len(found) >= 9, found
    wide = [(pid, address, port) for pid, address, port in found if not _loopback(address)]
    assert wide == [], f"listening beyond loopback: {wide}"


# -- the gateway port -------------------------------------------------------------------------
# What Envoy admin, the services' admin port and the receivers serve, by path.
FORBIDDEN_PATHS = ("/stats", "/stats/prometheus", "/server_info", "/config_dump", "/clusters", "/listeners",
                   "/quitquitquit", "/healthcheck/fail", "/logging", "/metrics", "/debug/threads", "/debug/memory",
                   "/debug/profile?seconds=1", "/v2/../debug/threads", "/v2/models/iris/../../../metrics",
                   "/v1/traces", "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
# Words only those endpoints answer with (Envoy stats and admin, Prometheus text, thread dumps).
FORBIDDEN_CONTENT = (b"cluster_manager", b"server.live", b"envoy_", b"# HELP", b"# TYPE", b"sluice_", b"MainThread",
                     b"grpc-handler", b"command_line_options", b"dynamic_active_clusters")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_the_gateway_port_never_serves_admin_metrics_debug_or_otlp(stack: Stack, method: str) -> None:
    # Even with a token that may call every model and the admin RPCs.
    token = stack.token(models=("iris",), admin=True)
    for path in FORBIDDEN_PATHS:
        for sent in (None, token):
            status, body = rest(stack, method, path, sent, b"{}" if method == "POST" else None)
            # Refused: by the gateway (404, 401/403 when secure) or, routed to a model's gRPC port,
            # by the service (a reset, 503): never an answer with content.
            assert status >= 400, (method, path, status, body[:300])
            assert not any(word in body for word in FORBIDDEN_CONTENT), (method, path, body[:300])
    # The OTLP trace service over gRPC (what the services and Envoy send spans to) is not routed.
    with stack.channel() as channel:
        export: Any = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        for sent in (None, token):
            metadata = (("authorization", f"Bearer {sent}"),) if sent else ()
            with pytest.raises(grpc.RpcError) as refused:
                export(b"", metadata=metadata, timeout=CALL_TIMEOUT)
            assert refused.value.code() != grpc.StatusCode.OK
    # /quitquitquit and /healthcheck/fail did nothing: the gateway still answers.
    assert infer(stack, token).model_name == "iris"
    assert stack.up.alive()


# -- tokens in logs and errors ----------------------------------------------------------------
def _bad_tokens(stack: Stack) -> dict[str, str]:
    good = stack.token()
    header, payload, signature = good.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    return {
        "expired": stack.token(ttl=1, now=1_000_000_000),
        "wrong audience": stack.token(audience="someone-else"),
        "bad signature": f"{header}.{payload}.{flipped}",
        "another model": stack.token(models=("mlp",)),
        "garbage": "not-a-jwt-" + signature,
    }


def test_no_log_and_no_error_message_contains_a_token(stack: Stack) -> None:
    good = stack.token()
    bad = _bad_tokens(stack)
    answers: list[str] = []
    assert infer(stack, good).model_name == "iris"
    status, body = rest(stack, "POST", "/v2/models/iris/infer", good, REST_BODY)
    assert status == 200, body
    for why, token in bad.items():
        try:
            infer(stack, token)
        except grpc.RpcError as exc:
            answers.append(f"{exc.code()} {exc.details()} {exc.trailing_metadata()}")
        else:
            assert not stack.secure, f"a token with {why} was accepted"
        status, body = rest(stack, "POST", "/v2/models/iris/infer", token, REST_BODY)
        answers.append(body.decode(errors="replace"))
        assert status == (401 if why != "another model" else 403) if stack.secure else status == 200, (why, body)
    # Every call is in Envoy's access log before the logs are read (it is flushed once a second).
    access = stack.run_dir / "logs" / "envoy-access.log"
    expected = 2 + 2 * len(bad)
    wait_for(lambda: access.exists() and access.read_text().count('"/v2/models/iris/infer"') >= 1 + len(bad)
             and access.read_text().count("ModelInfer") >= 1 + len(bad), 30, f"{expected} calls in {access}")
    secrets = [good, *bad.values()]
    parts = {part for token in secrets for part in token.split(".") if len(part) > 16}
    for path in sorted(stack.run_dir.rglob("*")):
        if not path.is_file() or path.parent.name == "pki":
            continue
        text = path.read_text(errors="replace")
        leaked = [part[:12] + "…" for part in parts if part in text]
        assert not leaked, f"{path} holds (part of) a token: {leaked}"
    for answer in answers:
        assert not any(part in answer for part in parts), answer


# -- the secure stack as a client sees it -----------------------------------------------------
def test_sluice_env_exports_the_ca_only_for_a_secure_stack(plain_stack: Stack, secure_stack: Stack) -> None:
    assert not {"SLUICE_CA", *ADMIN_ENV} & set(plain_stack.env)
    pki = (secure_stack.run_dir / "pki").resolve()
    assert {name: secure_stack.env.get(name) for name in ADMIN_ENV} == {
        "SLUICE_ADMIN_CA": str(pki / "ca.crt"), "SLUICE_ADMIN_CERT": str(pki / "admin.crt"),
        "SLUICE_ADMIN_KEY": str(pki / "admin.key")}
    assert secure_stack.ca is not None and secure_stack.ca.is_file()
    assert secure_stack.ca == (secure_stack.run_dir / "pki" / "ca.crt").resolve()
    refused = sluice("token", "--model", "iris", "--run-dir", str(plain_stack.run_dir), check=False)
    assert refused.returncode == 1 and "is not secure" in refused.stderr and refused.stdout == ""


def test_sluice_token_and_the_example_client_work_against_the_secure_stack(secure_stack: Stack) -> None:
    token = sluice("token", "--model", "iris", "--ttl", "10m", "--run-dir", str(secure_stack.run_dir)).stdout.strip()
    claims = tokens.verify(token, load_signing_key(secure_stack.run_dir / "pki" / "jwt.key").public_key())
    assert claims["models"] == ["iris"] and claims["admin"] is False and claims["exp"] - claims["iat"] == 600
    client = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--url", secure_stack.gateway],
                            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
                            env={**os.environ, "SLUICE_CA": str(secure_stack.ca), "SLUICE_TOKEN": token})
    assert client.returncode == 0, client.stdout + client.stderr
    assert "label 0 (setosa)" in client.stdout
    without = subprocess.run([sys.executable, str(ROOT / "examples" / "client.py"), "--url", secure_stack.gateway,
                              "--ca", str(secure_stack.ca)], capture_output=True, text=True, timeout=60,
                             check=False, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "SLUICE_TOKEN"})
    assert without.returncode != 0 and "UNAUTHENTICATED" in without.stderr, without.stderr


def test_the_secure_stack_refuses_with_the_right_codes(secure_stack: Stack) -> None:
    assert infer(secure_stack, secure_stack.token()).model_version
    assert infer_error(secure_stack, None).code() == grpc.StatusCode.UNAUTHENTICATED
    assert infer_error(secure_stack, _bad_tokens(secure_stack)["expired"]).code() == grpc.StatusCode.UNAUTHENTICATED
    assert infer_error(secure_stack, secure_stack.token(models=("mlp",))).code() == grpc.StatusCode.PERMISSION_DENIED
    status, _ = rest(secure_stack, "POST", "/v2/models/iris/infer", None, REST_BODY)
    assert status == 401
    # Plaintext to the TLS port gets nothing.
    with grpc.insecure_channel(secure_stack.gateway) as channel:
        with pytest.raises(grpc.RpcError) as plaintext:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                pb.ModelInferRequest(model_name="iris"), timeout=CALL_TIMEOUT,
                metadata=[("authorization", f"Bearer {secure_stack.token()}")])
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_secure_stacks_services_refuse_a_caller_without_a_client_certificate(secure_stack: Stack) -> None:
    state = json.loads((secure_stack.run_dir / "state.json").read_text())
    (service,) = state["services"]
    assert secure_stack.ca is not None
    pki = secure_stack.run_dir / "pki"
    for credentials in (None, grpc.ssl_channel_credentials(secure_stack.ca.read_bytes())):
        channel = grpc.insecure_channel(service) if credentials is None else grpc.secure_channel(service, credentials)
        with channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=CALL_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    mutual = grpc.ssl_channel_credentials(secure_stack.ca.read_bytes(), (pki / "client.key").read_bytes(),
                                          (pki / "client.crt").read_bytes())
    with grpc.secure_channel(service, mutual) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=CALL_TIMEOUT).ready


ADMIN_ENV = ("SLUICE_ADMIN_CA", "SLUICE_ADMIN_CERT", "SLUICE_ADMIN_KEY")


def _debug(stack: Stack, *args: str, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`sluice debug` in a shell that ran `eval "$(sluice env)"` (less the variables in ``drop``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "ETCDCTL_"))}
    env.update({k: v for k, v in stack.env.items() if k not in drop})
    return subprocess.run([*SLUICE, "debug", *args], capture_output=True, text=True, timeout=60, check=False,
                          env=env)


def test_sluice_debug_works_against_the_secure_stack_with_the_env_alone(secure_stack: Stack) -> None:
    """The admin identity is on for the services and the gateway controller: `sluice debug` works as
    docs/observability.md writes it, from `sluice env`, and a caller without the admin certificate
    gets no answer from either admin port (not even /metrics)."""
    gateway_metrics = secure_stack.env["SLUICE_METRICS"].split()[-1]
    assert gateway_metrics.startswith("https://127.0.0.1:")
    gateway_admin = gateway_metrics.removeprefix("https://").removesuffix("/metrics")
    for target in ("up-service-1", gateway_admin):
        done = _debug(secure_stack, "threads", target)
        assert done.returncode == 0, done.stderr
        assert "Thread MainThread" in done.stdout
        refused = _debug(secure_stack, "threads", target, drop=("SLUICE_ADMIN_CERT", "SLUICE_ADMIN_KEY"))
        assert refused.returncode == 1 and "admin client certificate" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    memory = _debug(secure_stack, "memory", "up-service-1", "--top", "0")
    assert memory.returncode == 0 and "loaded versions: " in memory.stdout, memory.stderr

    admin = ssl.create_default_context(cafile=secure_stack.env["SLUICE_ADMIN_CA"])
    admin.load_cert_chain(secure_stack.env["SLUICE_ADMIN_CERT"], secure_stack.env["SLUICE_ADMIN_KEY"])
    anonymous = ssl.create_default_context(cafile=secure_stack.env["SLUICE_ADMIN_CA"])
    for url in secure_stack.env["SLUICE_METRICS"].split():
        with urllib.request.urlopen(url, timeout=CALL_TIMEOUT, context=admin) as answer:
            assert answer.status == 200 and b"sluice_" in answer.read()
        assert _no_http_answer(url, anonymous)  # a failed handshake, not a 403
        assert _no_http_answer(url.replace("https://", "http://"), None)  # plaintext


def _no_http_answer(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        urllib.request.urlopen(url, timeout=CALL_TIMEOUT, context=context).close()
    except urllib.error.HTTPError:
        return False
    except OSError:
        return True
    return False


# -- the status document ----------------------------------------------------------------------
EXPECTED_AUTH = {False: {"tls": "off", "upstream_tls": "off", "jwt": "off"},
                 True: {"tls": "tls", "upstream_tls": "mtls", "jwt": "on"}}


def test_the_status_document_reports_the_auth_mode_in_force(stack: Stack) -> None:
    etcdctl = find_etcd("etcdctl")
    assert etcdctl is not None

    def status() -> dict[str, Any]:
        result = subprocess.run([etcdctl, "--endpoints", stack.env["SLUICE_ETCD_ENDPOINTS"], "get",
                                 f"{stack.env['SLUICE_ETCD_PREFIX']}models/iris/status", "--print-value-only"],
                                capture_output=True, text=True, timeout=30, check=True,
                                env={**os.environ, "ETCDCTL_API": "3"})
        return json.loads(result.stdout) if result.stdout.strip() else {}

    wait_for(lambda: "auth" in status(), 30, "the gateway's status document of iris")
    assert status()["auth"] == EXPECTED_AUTH[stack.secure]
