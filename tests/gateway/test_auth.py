"""JWT authentication and per-model authorization in the rendered config (gateway/auth.py), the
settings that turn it on, the key set's watch; accepted by a real Envoy."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import re
import socketserver
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import ValidationError

from gateway.auth import (
    JWT_FILTER,
    OPEN_ROUTES,
    PAYLOAD_KEY,
    RBAC_FILTER,
    STRIP_FILTER,
    AuthOptions,
    JwksError,
    JwksWatch,
    auth_options,
    fetch_jwks,
    parse_jwks,
)
from gateway.body_routing import LUA_FILTER
from gateway.envoy import find_envoy, validate_snapshot
from gateway.render import render_snapshot
from gateway.settings import GatewaySettings
from gateway.snapshot import Snapshot
from mesh.devstack.pki import jwks_of
from mesh.registry.records import InstanceRecord
from tests.gateway.test_render import OPTIONS, SCHEMA, instance, kv, routing, state

JWKS = json.dumps(jwks_of(ec.generate_private_key(ec.SECP256R1()), "k1"), sort_keys=True, separators=(",", ":"))
AUTH = AuthOptions(issuer="sluice-dev", audiences=("sluice",), jwks=JWKS)
ON = replace(OPTIONS, auth=AUTH)


def _rest_instance(model: str, version: int, port: int) -> Any:
    record = InstanceRecord(address=f"127.0.0.1:{port}", rest_address=f"127.0.0.1:{port + 1}", model=model,
                            version=version, instance_id=f"{model}-{port}")
    return kv(SCHEMA.instance(model, version, f"{model}-{port}"), record.to_json())


def _filters(snapshot: Snapshot) -> list[dict[str, Any]]:
    hcm = snapshot.listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def _routes(snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in snapshot.routes["virtual_hosts"][0]["routes"]}


def _policy(route: dict[str, Any]) -> dict[str, Any]:
    return dict(route["typed_per_filter_config"][RBAC_FILTER]["rbac"]["rules"]["policies"])


def _values(principals: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(claim, value) of every claim principal (both forms: list holding it, or equal to it)."""
    found = set()
    for principal in principals:
        for form in principal["or_ids"]["ids"]:
            matcher = form["sourced_metadata"]["metadata_matcher"]
            assert matcher["filter"] == JWT_FILTER and matcher["path"][0] == {"key": PAYLOAD_KEY}
            value = matcher["value"].get("string_match") or matcher["value"]["list_match"]["one_of"]["string_match"]
            found.add((matcher["path"][1]["key"], value["exact"]))
    return found


TWO_MODELS = state(_rest_instance("iris", 1, 7001), _rest_instance("mlp", 1, 7011))


def test_auth_off_renders_what_it_did_before() -> None:
    plain = render_snapshot(TWO_MODELS, {}, OPTIONS)
    assert plain == render_snapshot(TWO_MODELS, {}, replace(OPTIONS, auth=None))
    names = [f["name"] for f in _filters(plain)]
    assert JWT_FILTER not in names and RBAC_FILTER not in names and STRIP_FILTER not in names
    text = json.dumps(plain.routes)
    assert RBAC_FILTER not in text and JWT_FILTER not in text and "filter_metadata" not in text


def test_filter_order_and_nothing_after_rbac_clears_the_route_cache() -> None:
    snapshot = render_snapshot(TWO_MODELS, {}, replace(ON, rate_limits={"iris": 5}))
    names = [f["name"] for f in _filters(snapshot)]
    assert names == ["sluice.max_request_bytes", "sluice.body_model.extract", "sluice.body_model.headers",
                     STRIP_FILTER, JWT_FILTER, RBAC_FILTER, "envoy.filters.http.local_ratelimit",
                     "envoy.filters.http.grpc_stats", "envoy.filters.http.router"]
    # The Lua filter (the one that clears the route cache) runs before authentication; jwt_authn
    # would clear it only when told to, which it is not.
    assert names.index("sluice.body_model.headers") < names.index(JWT_FILTER)
    jwt = _filters(snapshot)[names.index(JWT_FILTER)]["typed_config"]
    assert "clear_route_cache" not in json.dumps(jwt)
    for after in _filters(snapshot)[names.index(RBAC_FILTER) + 1:]:
        assert "clear_route_cache" not in json.dumps(after) and after["name"] != LUA_FILTER


def test_provider_checks_issuer_audience_keys_and_strips_the_token() -> None:
    snapshot = render_snapshot(TWO_MODELS, {}, replace(ON, auth=replace(
        AUTH, claim_headers=(("sub", "x-jwt-sub"), ("team", "x-jwt-team")))))
    filters = {f["name"]: f["typed_config"] for f in _filters(snapshot)}
    provider = filters[JWT_FILTER]["providers"]["sluice"]
    assert provider["issuer"] == "sluice-dev" and provider["audiences"] == ["sluice"]
    assert json.loads(provider["local_jwks"]["inline_string"])["keys"][0]["kid"] == "k1"
    assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]
    assert provider["forward"] is False
    assert provider["claim_to_headers"] == [{"header_name": "x-jwt-sub", "claim_name": "sub"},
                                            {"header_name": "x-jwt-team", "claim_name": "team"}]
    assert filters[JWT_FILTER]["rules"] == [{"match": {"prefix": "/"}, "requires": {"provider_name": "sluice"}}]
    # A client's own x-jwt-sub is removed before jwt_authn, claim or no claim.
    assert filters[STRIP_FILTER]["mutations"]["request_mutations"] == [{"remove": "x-jwt-sub"},
                                                                       {"remove": "x-jwt-team"}]


def test_no_audience_means_any() -> None:
    snapshot = render_snapshot(TWO_MODELS, {}, replace(ON, auth=replace(AUTH, audiences=())))
    provider = next(f for f in _filters(snapshot) if f["name"] == JWT_FILTER)["typed_config"]["providers"]["sluice"]
    assert "audiences" not in provider


def test_every_route_of_a_model_carries_its_policy() -> None:
    routes = _routes(render_snapshot(TWO_MODELS, {}, ON))
    for model, other in (("iris", "mlp"), ("mlp", "iris")):
        mine = [r for name, r in routes.items() if name.startswith((f"{model}/", f"rest/{model}/"))]
        assert len(mine) >= 10  # pins, refusals, split; gRPC and REST
        for route in mine:
            policy = _policy(route)
            assert _values(policy["call"]["principals"]) == {("models", model), ("models", "*")}
            assert (other, "x") not in _values(policy["call"]["principals"])
            assert route["metadata"]["filter_metadata"]["sluice"] == {"model": model, "claim": "models"}
            assert "repository-admin" not in policy  # repository control is off


def test_single_model_default_routes_are_protected_too() -> None:
    routes = _routes(render_snapshot(state(instance("iris", 1, "a", 7001)), {}, ON))
    defaults = [r for name, r in routes.items() if name.startswith("default/")]
    assert defaults
    for route in defaults:
        assert _values(_policy(route)["call"]["principals"]) == {("models", "iris"), ("models", "*")}


def test_rate_limit_and_policy_live_side_by_side() -> None:
    routes = _routes(render_snapshot(TWO_MODELS, {}, replace(ON, rate_limits={"iris": 5})))
    for name in ("iris/split", "rest/iris/split"):
        per_filter = routes[name]["typed_per_filter_config"]
        assert set(per_filter) == {"envoy.filters.http.local_ratelimit", RBAC_FILTER}


def test_probes_are_open_everything_else_needs_a_token() -> None:
    routes = _routes(render_snapshot(TWO_MODELS, {}, replace(ON, answers_address="127.0.0.1:7999")))
    for name in OPEN_ROUTES:
        assert routes[name]["typed_per_filter_config"][JWT_FILTER]["disabled"] is True
    disabled = {name for name, r in routes.items() if JWT_FILTER in r.get("typed_per_filter_config", {})}
    assert disabled == set(OPEN_ROUTES)
    # The index and the metadata reveal models: they need a token (no per-route exception), and
    # any valid one will do (no policy).
    for name in ("rest/repository/index", "rest/metadata", "gateway/RepositoryIndex", "gateway/ServerMetadata",
                 "unknown-model", "missing-model-header"):
        assert RBAC_FILTER not in routes[name].get("typed_per_filter_config", {})


def test_access_rule_of_the_routing_document_overrides_the_default() -> None:
    snapshot = render_snapshot(state(_rest_instance("iris", 1, 7001), _rest_instance("mlp", 1, 7011),
                                     routing("iris", {"weights": {"1": 1},
                                                      "access": {"claim": "groups", "allow": ["team-a", "team-b"]}}),
                                     routing("mlp", {"weights": {"1": 1}, "access": {"claim": "g", "allow": ["*"]}})),
                               {}, ON)
    routes = _routes(snapshot)
    assert _values(_policy(routes["iris/split"])["call"]["principals"]) == {("groups", "team-a"), ("groups", "team-b")}
    assert routes["rest/iris/split"]["metadata"]["filter_metadata"]["sluice"]["claim"] == "groups"
    assert _policy(routes["mlp/split"])["call"]["principals"] == [{"any": True}]


def test_repository_control_needs_the_admin_claim() -> None:
    routes = _routes(render_snapshot(TWO_MODELS, {}, replace(ON, allow_repository_control=True)))
    for name in ("iris/split", "rest/iris/repository"):
        policy = _policy(routes[name])
        admin = policy["repository-admin"]
        matcher = admin["principals"][0]["sourced_metadata"]["metadata_matcher"]
        assert matcher["path"] == [{"key": PAYLOAD_KEY}, {"key": "admin"}]
        assert matcher["value"] == {"bool_match": True}
        paths = json.dumps(admin["permissions"])
        assert "/inference.GRPCInferenceService/RepositoryModelLoad" in paths
        assert r"/v2/repository/models/iris/(load|unload)/?" in paths
        # Calling the model never covers loading it: the call policy excludes those paths.
        assert policy["call"]["permissions"] == [{"not_rule": admin["permissions"][0]}]


def test_reply_mappers_come_first_and_only_when_on() -> None:
    def mappers(snapshot: Snapshot) -> list[dict[str, Any]]:
        hcm = snapshot.listener["filter_chains"][0]["filters"][0]["typed_config"]
        return list(hcm["local_reply_config"]["mappers"])

    plain = mappers(render_snapshot(TWO_MODELS, {}, OPTIONS))
    secured = mappers(render_snapshot(TWO_MODELS, {}, ON))
    assert secured[len(secured) - len(plain):] == plain
    assert [m.get("status_code") for m in secured[:len(secured) - len(plain)]] == [None, None, 401, 401]
    secured = mappers(render_snapshot(TWO_MODELS, {}, replace(ON, allow_repository_control=True)))
    added = secured[:len(secured) - len(plain)]
    assert [m.get("status_code") for m in added] == [None, None, None, None, 401, 401]
    text = json.dumps(added)
    assert "%METADATA(ROUTE:sluice:model)%" in text and "authentication failed: %LOCAL_REPLY_BODY%" in text
    assert "'admin' is true" in text


def test_reply_mappers_tell_rest_from_grpc_by_content_type_as_the_routes_do() -> None:
    """A REST request to any path (not only /v2) gets JSON: the mappers classify by content-type,
    an absent one counting as REST; gRPC's is application/grpc alone or followed by "+" or ";"."""
    hcm = render_snapshot(TWO_MODELS, {}, replace(ON, allow_repository_control=True)).listener[
        "filter_chains"][0]["filters"][0]["typed_config"]
    added = hcm["local_reply_config"]["mappers"][:6]
    for found in added:
        conditions = found["filter"]["and_filter"]["filters"]
        kinds = [c["header_filter"]["header"] for c in conditions
                 if c.get("header_filter", {}).get("header", {}).get("name") == "content-type"]
        assert len(kinds) == 1, conditions
        (header,) = kinds
        as_json = "json_format" in found["body_format_override"]
        assert header.get("invert_match", False) is as_json
        assert header.get("treat_missing_header_as_empty", False) is as_json
        pattern = re.compile(header["string_match"]["safe_regex"]["regex"])
        for value, grpc in (("application/grpc", True), ("application/grpc+proto", True),
                            ("application/grpc;charset=utf-8", True), ("application/json", False),
                            ("application/grpc-web", False), ("", False)):
            assert (pattern.fullmatch(value) is not None) is grpc, value


# -- settings -------------------------------------------------------------------------------------------


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(JWKS)
    return path


def test_settings_turn_auth_on_with_an_issuer(jwks_file: Path) -> None:
    settings = GatewaySettings(jwt_issuer="sluice-dev", jwt_audiences=["sluice", "other"], jwt_jwks=jwks_file,
                               jwt_claim_headers={"sub": "X-Jwt-Sub", "team": "x-team"})
    options = auth_options(settings)
    assert options is not None
    assert options.jwks == JWKS and options.audiences == ("sluice", "other")
    assert options.claim_headers == (("sub", "x-jwt-sub"), ("team", "x-team"))
    assert (options.access_claim, options.admin_claim) == ("models", "admin")
    assert auth_options(GatewaySettings()) is None


def test_settings_from_the_environment(jwks_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_GATEWAY_JWT_ISSUER", "iss")
    monkeypatch.setenv("SLUICE_GATEWAY_JWT_AUDIENCES", "a, b")
    monkeypatch.setenv("SLUICE_GATEWAY_JWT_JWKS", str(jwks_file))
    monkeypatch.setenv("SLUICE_GATEWAY_JWT_CLAIM_HEADERS", "sub=x-jwt-sub,email=x-jwt-email")
    settings = GatewaySettings()
    assert settings.jwt_audiences == ["a", "b"]
    assert settings.jwt_claim_headers == {"sub": "x-jwt-sub", "email": "x-jwt-email"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"jwt_issuer": "iss"}, "needs exactly one of --jwt-jwks FILE and --jwt-jwks-uri URL"),
    ({"jwt_jwks": "JWKS"}, "need --jwt-issuer"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "jwt_jwks_uri": "https://idp/jwks"}, "exactly one of"),
    ({"jwt_issuer": "iss", "jwt_jwks_uri": "ftp://idp/jwks"}, "not an http:// or https:// URL"),
    ({"jwt_issuer": "iss", "jwt_jwks": "MISSING"}, "cannot be read"),
    ({"jwt_issuer": "iss", "jwt_jwks": "NOT_JWKS"}, "not a JWKS"),
    ({"jwt_issuer": "", "jwt_jwks": "JWKS"}, "--jwt-issuer '': must be 1 to 256 printable characters"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "jwt_claim_headers": {"sub": "authorization"}},
     "'authorization' is a header the gateway or gRPC uses"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "jwt_claim_headers": {"sub": "x-model-name"}}, "x-model-name"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "jwt_claim_headers": {"sub": "bad header"}}, "not an HTTP header"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "jwt_claim_headers": {"a": "x-a", "b": "x-A"}}, "for two claims"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "access_claim": "a b"}, "--access-claim: 'a b' is not a claim"),
    ({"jwt_issuer": "iss", "jwt_jwks": "JWKS", "jwt_claim_headers": ["sub"]}, "is not CLAIM=HEADER"),
])
def test_bad_jwt_settings_name_the_flag(fields: dict[str, Any], message: str, jwks_file: Path) -> None:
    paths = {"JWKS": jwks_file, "MISSING": jwks_file.with_name("missing.json"),
             "NOT_JWKS": jwks_file.with_name("not.json")}
    paths["NOT_JWKS"].write_text('{"keys": []}')
    given: dict[str, Any] = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(ValidationError) as excinfo:
        GatewaySettings(**given)
    assert message in str(excinfo.value)


# -- the key set's watch ------------------------------------------------------------------------------


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_a_rotated_key_set_is_noticed_and_a_broken_one_ignored(jwks_file: Path) -> None:
    watch = JwksWatch(JWKS, path=jwks_file)
    assert await watch.check() is None
    rotated = json.dumps(jwks_of(ec.generate_private_key(ec.SECP256R1()), "k2"), sort_keys=True,
                         separators=(",", ":"))
    tmp = jwks_file.with_name(".jwks.tmp")
    tmp.write_text(rotated)
    os.replace(tmp, jwks_file)  # the way a Secret volume or an atomic writer rotates it
    assert await watch.check() == rotated
    assert await watch.check() is None
    os.replace(_written(tmp, '{"keys": ['), jwks_file)  # broken: the last good set stays
    assert await watch.check() is None
    assert watch.current == rotated
    os.unlink(jwks_file)
    assert await watch.check() is None


# -- a real Envoy --------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_real_envoy_accepts_the_secured_config() -> None:
    snapshot = render_snapshot(
        state(_rest_instance("iris", 1, 7001), _rest_instance("mlp", 1, 7011),
              routing("mlp", {"weights": {"1": 1}, "access": {"claim": "groups", "allow": ["team-a", "*"]}})),
        {}, replace(ON, allow_repository_control=True, rate_limits={"iris": 5}, answers_address="127.0.0.1:7999",
                    auth=replace(AUTH, claim_headers=(("sub", "x-jwt-sub"), ("email", "x-jwt-email")))))
    await validate_snapshot(find_envoy(), snapshot)
    # Before the first fetch of a remote key set, the provider has a key no token matches.
    remote = auth_options(GatewaySettings(jwt_issuer="iss", jwt_jwks_uri="https://idp.example/jwks.json"))
    assert remote is not None
    await validate_snapshot(find_envoy(), render_snapshot(TWO_MODELS, {}, replace(ON, auth=remote)))


async def test_a_remote_key_set_is_fetched_and_refetched() -> None:
    served = {"body": JWKS.encode()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        watch = JwksWatch("", uri=uri, refresh=0.0, retry=0.0)
        assert await watch.check() == JWKS
        served["body"] = b"<html>not keys</html>"  # a broken answer keeps the last good set
        assert await watch.check() is None
        assert watch.current == JWKS
        rotated = json.dumps(jwks_of(ec.generate_private_key(ec.SECP256R1()), "k3"), sort_keys=True,
                             separators=(",", ":"))
        served["body"] = rotated.encode()
        assert await watch.check() == rotated
    finally:
        server.shutdown()
        server.server_close()


# -- the keys themselves ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _rsa_jwk() -> dict[str, Any]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    return {"kty": "RSA", "n": _b64(numbers.n.to_bytes(256, "big")), "e": _b64(numbers.e.to_bytes(3, "big"))}


EC_JWK = json.loads(JWKS)["keys"][0]
OKP_JWK = {"kty": "OKP", "crv": "Ed25519",
           "x": _b64(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw())}


def test_every_kind_of_key_envoy_takes_passes() -> None:
    document = {"keys": [EC_JWK, _rsa_jwk(), OKP_JWK, {"kty": "oct", "k": _b64(b"0123456789abcdef")}]}
    assert json.loads(parse_jwks(json.dumps(document).encode(), "f"))["keys"][0] == EC_JWK


@pytest.mark.parametrize(("key", "message"), [
    ({"kty": "RSA"}, 'key 0: RSA key without a base64url "n"'),
    ({"kty": "RSA", "n": "AQAB"}, 'without a base64url "e"'),
    ({"kty": "RSA", "n": "AQAB", "e": "AQAB"}, "RSA key of 17 bits"),
    ({**EC_JWK, "x": "AA"}, "x or y is not 32 bytes"),
    ({**EC_JWK, "y": EC_JWK["x"]}, "key 0: "),  # not on the curve
    ({**EC_JWK, "x": "not base64!"}, 'without a base64url "x"'),
    ({**EC_JWK, "crv": "P-192"}, "not one of P-256, P-384, P-521"),
    ({"kty": "OKP", "crv": "Ed25519", "x": "AA"}, "key 0: "),
    ({"kty": "oct"}, 'oct key without a base64url "k"'),
    ({"kty": "DSA"}, "kty 'DSA' is not one of"),
    ("RSA", 'not a JWK (an object with "kty")'),
])
def test_a_key_that_cannot_check_a_token_is_refused(key: object, message: str) -> None:
    with pytest.raises(JwksError) as excinfo:
        parse_jwks(json.dumps({"keys": [EC_JWK, key]}).encode(), "f")
    assert message.replace("key 0", "key 1") in str(excinfo.value)


@pytest.mark.slow
async def test_envoy_takes_every_kind_of_key_that_passes() -> None:
    jwks = parse_jwks(json.dumps({"keys": [EC_JWK, _rsa_jwk(), OKP_JWK]}).encode(), "f")
    await validate_snapshot(find_envoy(), render_snapshot(TWO_MODELS, {}, replace(ON, auth=replace(AUTH, jwks=jwks))))


def test_a_deeply_nested_key_set_is_an_error_not_a_crash(tmp_path: Path) -> None:
    deep = b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(JwksError, match="nested too deeply"):
        parse_jwks(deep, "f")
    path = _written(tmp_path / "deep.json", deep.decode())
    with pytest.raises(ValidationError, match="nested too deeply"):
        GatewaySettings(jwt_issuer="iss", jwt_jwks=path)


def _serve_raw(answer: bytes) -> tuple[socketserver.TCPServer, str]:
    """A server answering every connection with ``answer`` (bytes on the wire), then closing it."""
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(answer)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/jwks.json"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(150)) + b"\r\n{}",  # > 100 headers
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n400\r\n" + b"{" * 10,  # chunked body cut short
    b"HTTP/1.1 200 OK\r\ncontent-length: 200002\r\n\r\n" + b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"not http at all\r\n\r\n",
])
async def test_a_broken_remote_answer_keeps_the_last_good_key_set(answer: bytes) -> None:
    server, uri = _serve_raw(answer)
    try:
        watch = JwksWatch(JWKS, uri=uri, refresh=0.0, retry=0.0)
        with pytest.raises(JwksError, match=r"jwks\.json"):
            await asyncio.to_thread(fetch_jwks, uri)
        assert await watch.check() is None  # logged, and the watch (the gateway) carries on
        assert watch.current == JWKS
    finally:
        server.shutdown()
        server.server_close()
