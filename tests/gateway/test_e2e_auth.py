"""JWT authentication and per-model authorization through the real gateway (real Envoy, real etcd,
a real ``sluice serve``), with tokens minted by mesh/devstack/tokens.py, over gRPC and REST.

Models: ``iris`` (the real service, with repository control on so that the gateway's decision is
what is tested), ``mlp`` (the same host registered under another name: only its policy matters
here) and ``echo`` (a small HTTP peer that records the headers a service receives, REST only).
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.devstack.pki import JWT_KEY_ID, DevPki, jwks_of, load_signing_key
from mesh.devstack.tokens import mint
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle, start_gateway
from tests.fixtures.etcd import EtcdServer
from tests.fixtures.service import ServiceHandle
from tests.gateway.conftest import repository_control_service
from tests.gateway.traffic import RPC_TIMEOUT_S, eventually, iris_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]

ROUTABLE_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def key(pki: DevPki) -> ec.EllipticCurvePrivateKey:
    return load_signing_key(pki.jwt_key)


def token(key: ec.EllipticCurvePrivateKey, models: list[str], **kwargs: Any) -> str:
    return mint(key, subject=kwargs.pop("subject", "alice"), models=models, **kwargs)


@pytest.fixture(scope="module")
def service(iris_repos: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    yield from repository_control_service(iris_repos[1], tmp_path_factory.mktemp("auth-service"), "iris-auth")


class _Echo(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if "/infer" in self.path:
            _Echo.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = b'{"ready": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 (the names http.server calls)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def echo() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def jwks_path(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth-jwks") / "jwks.json"
    shutil.copy(pki.jwks, path)
    return path


@pytest.fixture(scope="module")
def gateway(  # noqa: PLR0917 (pytest fixtures)
        shared_etcd: EtcdServer, gateway_prefix: str, service: ServiceHandle, echo: Any, jwks_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    handle = start_gateway(shared_etcd, gateway_prefix, tmp_path_factory.mktemp("auth-gateway"),
                           "--jwt-issuer", "sluice-dev", "--jwt-audience", "sluice", "--jwt-jwks", str(jwks_path),
                           "--allow-repository-control")
    try:
        schema = KeySchema(gateway_prefix)
        rest = f"127.0.0.1:{service.rest_port}"
        echo_address = f"127.0.0.1:{echo.server_address[1]}"
        for model, address, rest_address in (("iris", service.address, rest), ("mlp", service.address, rest),
                                             ("echo", service.address, echo_address)):
            doc = InstanceRecord(address=address, rest_address=rest_address, model=model, version=1,
                                 instance_id=f"{model}-1")
            shared_etcd.etcdctl("put", schema.instance(model, 1, f"{model}-1"), doc.to_json().decode())
        yield handle
    finally:
        handle.stop()


def _bearer(value: str | None) -> tuple[tuple[str, str], ...]:
    return () if value is None else (("authorization", f"Bearer {value}"),)


async def _ready(address: str, model: str, bearer: str | None, extra: tuple[tuple[str, str], ...] = ()
                 ) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            await stub.ModelReady(pb.ModelReadyRequest(name=model), metadata=_bearer(bearer) + extra,
                                  timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""


def _rest(address: str, method: str, path: str, bearer: str | None, body: bytes | None = None, *,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        sent = dict(headers or {})
        if bearer is not None:
            sent["authorization"] = f"Bearer {bearer}"
        if body is not None:
            sent["content-type"] = "application/json"
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else {}
    finally:
        connection.close()


@pytest.fixture(scope="module")
def routable(gateway: GatewayHandle, key: ec.EllipticCurvePrivateKey) -> GatewayHandle:
    good = token(key, ["iris"])
    deadline = time.monotonic() + ROUTABLE_TIMEOUT_S
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while True:
            try:
                stub.ModelReady(pb.ModelReadyRequest(name="iris"), metadata=_bearer(good), timeout=5)
                # Every model routed: the unknown-model answer lists them.
                stub.ModelReady(pb.ModelReadyRequest(name="nosuch"), metadata=_bearer(good), timeout=5)
            except grpc.RpcError as exc:
                if "served models: echo, iris, mlp" in (exc.details() or ""):
                    return gateway
                if time.monotonic() > deadline:
                    pytest.fail(f"iris not callable with a token within {ROUTABLE_TIMEOUT_S}s")
                time.sleep(0.1)


async def test_refused_tokens_say_which_part_failed(routable: GatewayHandle, key: ec.EllipticCurvePrivateKey) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    cases = {
        None: "Jwt is missing",
        token(key, ["iris"], now=time.time() - 7200): "Jwt is expired",
        token(key, ["iris"], audience="elsewhere"): "Audiences in Jwt are not allowed",
        token(key, ["iris"], issuer="someone-else"): "Jwt issuer is not configured",
        token(other_key, ["iris"]): "Jwt verification fails",  # same key id, another key
        "not-a-jwt": "Jwt",
    }
    for bad, reason in cases.items():
        code, message = await _ready(routable.address, "iris", bad)
        assert code is grpc.StatusCode.UNAUTHENTICATED, (bad, code, message)
        assert message.startswith("authentication failed: ") and reason in message
        assert bad is None or bad not in message  # the token is never echoed
        status, body = _rest(routable.address, "GET", "/v2/models/iris/ready", bad)
        assert status == 401 and body["error"].startswith("authentication failed: ") and reason in body["error"]


async def test_a_rest_request_outside_v2_is_refused_in_json(routable: GatewayHandle) -> None:
    """Any non-gRPC request is REST to the reply mappers, as to the routes: no token on a path
    outside /v2, with a JSON body or none (no content-type), is a JSON 401."""
    for body in (b'{"inputs": []}', None):
        status, answer = _rest(routable.address, "POST", "/foo", None, body)
        assert status == 401 and answer["error"] == "authentication failed: Jwt is missing", (body, answer)


async def test_allowed_calls_pass_over_grpc_and_rest(routable: GatewayHandle,
                                                     key: ec.EllipticCurvePrivateKey) -> None:
    for claims in ({"models": ["iris"]}, {"models": ["mlp", "iris"]}, {"models": ["*"]}, {"models": "iris"}):
        good = token(key, [], extra=claims)
        async with grpc.aio.insecure_channel(routable.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            response = await stub.ModelInfer(iris_request(), metadata=_bearer(good), timeout=RPC_TIMEOUT_S)
            assert response.model_name == "iris"
        status, body = _rest(routable.address, "GET", "/v2/models/iris", good)
        assert status == 200 and body["name"] == "iris"


async def test_a_token_for_another_model_is_denied_naming_the_model(routable: GatewayHandle,
                                                                    key: ec.EllipticCurvePrivateKey) -> None:
    for_mlp = token(key, ["mlp"])
    code, message = await _ready(routable.address, "iris", for_mlp)
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert "model 'iris' may not be called with this token" in message and "'models'" in message
    assert for_mlp not in message
    code, _ = await _ready(routable.address, "iris", for_mlp, (("x-model-name", "iris"),))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    status, body = _rest(routable.address, "POST", "/v2/models/iris/infer", for_mlp, b"{}")
    assert status == 403 and "model 'iris' may not be called" in body["error"]


async def test_the_model_named_in_the_body_is_the_one_authorized(routable: GatewayHandle,
                                                                 key: ec.EllipticCurvePrivateKey) -> None:
    for_iris = token(key, ["iris"])
    # No header, the body names mlp: body routing picks mlp's route, and mlp's policy refuses.
    code, message = await _ready(routable.address, "mlp", for_iris)
    assert code is grpc.StatusCode.PERMISSION_DENIED and "model 'mlp'" in message, message
    async with grpc.aio.insecure_channel(routable.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = iris_request()
        request.model_name = "mlp"
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.ModelInfer(request, metadata=_bearer(for_iris), timeout=RPC_TIMEOUT_S)
        assert excinfo.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # A header naming the allowed model over a body naming the other never gets through.
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.ModelReady(pb.ModelReadyRequest(name="mlp"),
                                  metadata=(*_bearer(for_iris), ("x-model-name", "iris")), timeout=RPC_TIMEOUT_S)
        assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.ModelInfer(request, metadata=(*_bearer(for_iris), ("x-model-name", "iris")),
                                  timeout=RPC_TIMEOUT_S)
        assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # the service compares them


async def test_probes_need_no_token_and_the_index_does(routable: GatewayHandle) -> None:
    assert _rest(routable.address, "GET", "/v2/health/live", None)[0] == 200
    assert _rest(routable.address, "GET", "/v2/health/ready", None)[0] == 200
    async with grpc.aio.insecure_channel(routable.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=RPC_TIMEOUT_S)).live
        assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=RPC_TIMEOUT_S)).ready
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=RPC_TIMEOUT_S)
        assert excinfo.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert _rest(routable.address, "POST", "/v2/repository/index", None, b"{}")[0] == 401
    assert _rest(routable.address, "GET", "/v2", None)[0] == 401


async def test_a_forged_claim_header_never_reaches_the_service(routable: GatewayHandle,
                                                               key: ec.EllipticCurvePrivateKey) -> None:
    _Echo.seen.clear()
    good = token(key, ["echo"], subject="alice")

    def sent() -> int:
        return _rest(routable.address, "POST", "/v2/models/echo/infer", good, b"{}",
                     headers={"x-jwt-sub": "mallory"})[0]

    async def through() -> bool:
        return await asyncio.to_thread(sent) == 200

    await eventually(through, ROUTABLE_TIMEOUT_S, "echo reachable")
    headers = _Echo.seen[-1]
    assert headers["x-jwt-sub"] == "alice"
    assert "authorization" not in headers  # the token is not forwarded


async def test_repository_control_needs_the_admin_claim(routable: GatewayHandle,
                                                        key: ec.EllipticCurvePrivateKey) -> None:
    user, admin = token(key, ["iris"]), token(key, ["iris"], admin=True)
    async with grpc.aio.insecure_channel(routable.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), metadata=_bearer(user),
                                           timeout=RPC_TIMEOUT_S)
        assert excinfo.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "needs a token whose claim 'admin' is true" in (excinfo.value.details() or "")
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), metadata=_bearer(admin),
                                       timeout=30)
    status, body = _rest(routable.address, "POST", "/v2/repository/models/iris/load", user, b"{}")
    assert status == 403 and "'admin' is true" in body["error"]
    assert _rest(routable.address, "POST", "/v2/repository/models/iris/load", admin, b"{}")[0] == 200
    assert (await _ready(routable.address, "iris", user))[0] is grpc.StatusCode.OK


def _sent(address: str, method: str, path: str, bearer: str) -> tuple[int, bool]:
    """(status, whether Envoy proxied it to a service) of ``path`` sent exactly as written."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT_S)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (("authorization", f"Bearer {bearer}"), ("content-type", "application/json"),
                            ("content-length", "0" if method == "HEAD" else "2")):
            connection.putheader(name, value)
        connection.endheaders(b"" if method == "HEAD" else b"{}")
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("x-envoy-upstream-service-time") is not None
    finally:
        connection.close()


async def test_an_admin_reaches_the_service_through_every_routed_spelling(
        routable: GatewayHandle, key: ec.EllipticCurvePrivateKey) -> None:
    # The control of the test below: what reaches the service shows as proxied.
    admin = token(key, ["iris"], admin=True)
    for path in ("/v2/repository/models/iris/load", "/v2/repository/models/iris/load/?x=1",
                 "//v2/repository/models/iris//load"):
        assert await asyncio.to_thread(_sent, routable.address, "POST", path, admin) == (200, True), path


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/repository/models/iris/load/"),
    ("POST", "/v2/repository/models/iris/load?x=1"),
    ("POST", "/v2/repository/models/iris/load/?x=1"),
    ("POST", "/v2/repository/models/iris/unload?"),
    ("POST", "//v2/repository/models/iris/load"),
    ("POST", "/v2//repository/models/iris/load"),
    ("POST", "/v2/repository/models/iris//load"),
    ("POST", "/v2/repository/models//iris/load"),
    ("POST", "/v2/repository/models/iris/./load"),
    ("POST", "/v2/repository/models/iris/x/../load"),
    ("POST", "/v2/repository/models/iris%2Fload"),
    ("POST", "/v2/repository/models/iris/%6coad"),
    ("POST", "/v2/repository/models/%69ris/load"),
    ("POST", "/v2/repository/models/iris/LOAD"),
    ("POST", "/v2/repository/models/iris/load;x=1"),
    ("HEAD", "/v2/repository/models/iris/load"),
    ("GET", "/v2/repository/models/iris/load"),
    ("PUT", "/v2/repository/models/iris/unload/"),
])
async def test_no_spelling_of_repository_control_passes_without_the_admin_claim(
        routable: GatewayHandle, key: ec.EllipticCurvePrivateKey, method: str, path: str) -> None:
    # A caller who may call iris, but is no admin: whatever route the spelling takes, it is refused
    # by the admin policy (403) or answered by the gateway itself; it never reaches the service.
    status, proxied = await asyncio.to_thread(_sent, routable.address, method, path, token(key, ["iris"]))
    assert status == 403 or (not proxied and status >= 400), (status, proxied)


def _rotate(path: Path, keys: list[ec.EllipticCurvePrivateKey], kids: list[str]) -> None:
    document = {"keys": [json.loads(json.dumps(jwks_of(k, kid)))["keys"][0] for k, kid in zip(keys, kids, strict=True)]}
    tmp = path.with_name(".jwks.tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


async def test_jwks_rotation_under_load_loses_no_request(routable: GatewayHandle, key: ec.EllipticCurvePrivateKey,
                                                         jwks_path: Path) -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    old, new = token(key, ["iris"]), token(new_key, ["iris"], key_id="rotated")
    current = {"token": old}
    failures: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal done
        async with grpc.aio.insecure_channel(routable.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while not stop.is_set():
                try:
                    await stub.ModelInfer(iris_request(), metadata=_bearer(current["token"]), timeout=RPC_TIMEOUT_S)
                    done += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")

    async def passes(bearer: str) -> bool:
        return (await _ready(routable.address, "iris", bearer))[0] is grpc.StatusCode.OK

    clients = [asyncio.create_task(load()) for _ in range(4)]
    try:
        assert not await passes(new)
        await asyncio.to_thread(_rotate, jwks_path, [key, new_key], [JWT_KEY_ID, "rotated"])  # overlap
        await eventually(lambda: passes(new), ROUTABLE_TIMEOUT_S, "the new key accepted")
        current["token"] = new
        await asyncio.to_thread(_rotate, jwks_path, [new_key], ["rotated"])  # the old key retired

        async def old_refused() -> bool:
            return not await passes(old)

        await eventually(old_refused, ROUTABLE_TIMEOUT_S, "the old key refused")
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert done > 50
    assert failures == []
    assert await passes(new)
