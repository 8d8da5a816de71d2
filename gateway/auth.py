"""JWT authentication and per-model authorization at the gateway, with Envoy's own filters.

With ``--jwt-issuer`` set, the listener gets three more HTTP filters after body routing
(gateway/body_routing.py), in this order:

1. ``header_mutation`` removes every client-sent header that a claim is forwarded in
   (``x-jwt-sub``, …): ``claim_to_headers`` overwrites such a header only when the claim is
   present, so without this a token lacking the claim would let a forged header through;
2. ``jwt_authn`` checks the token in ``authorization: Bearer`` (issuer, audiences, signature by a
   key of the JWKS, expiry), strips it (``forward: false``), writes the payload into dynamic
   metadata and forwards the configured claims as headers. Every route needs a token except the
   load-balancer probes (:data:`OPEN_ROUTES`, per-route ``disabled``);
3. ``rbac``: each route of a model carries an ``RBACPerRoute`` policy over the token's claims
   (``sourced_metadata`` on the jwt payload); routes without one (the gateway's own answers)
   allow any authenticated caller.

Neither filter clears the route cache, nor does any filter after them: the policy that ran is the
policy of the route the router takes, the one body routing selected.

The JWKS is rendered inline (Envoy 1.40 reads a ``local_jwks`` file once, at config load, and
ignores later changes even with ``watched_directory``): :class:`JwksWatch` re-reads the file (or
refetches the URI) and the controller publishes a new snapshot with the new key set.

Pure, except :func:`read_jwks`, :func:`fetch_jwks` and :class:`JwksWatch`, which do the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import os
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.rest_routes import REPOSITORY_OPERATIONS
from mesh.protocol import MODEL_HEADER, VERSION_HEADER, clip
from mesh.registry.records import ACCESS_CLAIM_RE, AccessRule

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

Resource = dict[str, Any]
log = structlog.get_logger("gateway.auth")

JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"
STRIP_FILTER = "sluice.auth.strip_claim_headers"
PROVIDER = "sluice"
PAYLOAD_KEY = "jwt_payload"
"""Key of the verified payload in the jwt_authn filter's dynamic metadata."""
ROUTE_METADATA = "sluice"
"""Route metadata namespace: ``model`` and ``claim`` of a protected route, for the denial message."""
ALL_MODELS = "*"
"""In the access claim: every model. In an access rule's ``allow``: any caller with a valid token."""
JWKS_MAX_BYTES = 256 * 1024
JWKS_MAX_KEYS = 64
TEXT_MAX = 256
OPEN_ROUTES = ("rest/health/live", "rest/health/ready", "gateway/ServerLive", "gateway/ServerReady")
"""Routes that answer without a token: liveness and readiness for load balancers and probes.
Everything else, the server metadata and the repository index included, needs one."""
REPOSITORY_RPCS = ("RepositoryModelLoad", "RepositoryModelUnload")

_SERVICE_PATH = "/inference.GRPCInferenceService/"
_HEADER_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_RESERVED_HEADERS = frozenset({"authorization", "host", "content-type", "content-length", "te", "user-agent",
                               "cookie", "x-request-id", "traceparent", "tracestate", MODEL_HEADER,
                               VERSION_HEADER})
_JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3."
_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3."


class JwksError(ValueError):
    """A key set that cannot be used; the message names the source and what is wrong."""


@dataclass(frozen=True)
class AuthOptions:
    """What shapes the rendered authentication and authorization (from :class:`GatewaySettings`)."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""
    """The key set in force, as canonical JSON text (rendered inline)."""
    claim_headers: tuple[tuple[str, str], ...] = (("sub", "x-jwt-sub"),)
    """(claim, header) pairs forwarded to the services."""
    access_claim: str = "models"
    admin_claim: str = "admin"


# -- settings ---------------------------------------------------------------------------------------


def _text_problem(flag: str, value: str) -> str | None:
    if not value or len(value) > TEXT_MAX or not value.isprintable():
        return f"{flag} {clip(value)!r}: must be 1 to {TEXT_MAX} printable characters"
    return None


def settings_problems(settings: GatewaySettings) -> list[str]:
    """Every problem with the JWT settings, each naming its flag (empty: fine)."""
    s = settings
    problems: list[str] = []
    if s.jwt_issuer is None:
        if s.jwt_jwks is not None or s.jwt_jwks_uri is not None or s.jwt_audiences:
            problems.append("--jwt-jwks, --jwt-jwks-uri and --jwt-audience need --jwt-issuer (JWT authentication "
                            "is on only with an issuer)")
        return problems
    problems += filter(None, [_text_problem("--jwt-issuer", s.jwt_issuer)])
    problems += filter(None, [_text_problem("--jwt-audience", a) for a in s.jwt_audiences])
    if (s.jwt_jwks is None) == (s.jwt_jwks_uri is None):
        problems.append("--jwt-issuer needs exactly one of --jwt-jwks FILE and --jwt-jwks-uri URL (the keys "
                        "tokens are checked with)")
    if s.jwt_jwks is not None:
        try:
            read_jwks(s.jwt_jwks)
        except JwksError as exc:
            problems.append(f"--jwt-jwks {exc}")
    if s.jwt_jwks_uri is not None:
        problem = uri_problem(s.jwt_jwks_uri)
        if problem:
            problems.append(f"--jwt-jwks-uri {problem}")
    for flag, claim in (("--access-claim", s.access_claim), ("--admin-claim", s.admin_claim),
                        *(("--jwt-claim-header", c) for c in s.jwt_claim_headers)):
        if not ACCESS_CLAIM_RE.fullmatch(claim):
            problems.append(f"{flag}: {clip(claim)!r} is not a claim name (1 to 64 of A-Z a-z 0-9 _ . : -)")
    seen: set[str] = set()
    for header in s.jwt_claim_headers.values():
        name = header.lower()
        if not _HEADER_RE.fullmatch(name) or len(name) > 128:
            problems.append(f"--jwt-claim-header: {clip(header)!r} is not an HTTP header name")
        elif name in _RESERVED_HEADERS or name.startswith(("grpc-", "x-envoy-", "x-sluice-")):
            problems.append(f"--jwt-claim-header: {name!r} is a header the gateway or gRPC uses; pick another "
                            "(e.g. x-jwt-<claim>)")
        elif name in seen:
            problems.append(f"--jwt-claim-header: {name!r} is given for two claims")
        seen.add(name)
    return problems


def auth_options(settings: GatewaySettings) -> AuthOptions | None:
    """The rendered options of ``settings`` (None: authentication off). Reads a local JWKS file;
    a remote one is fetched by :class:`JwksWatch` once the controller runs (until then no key)."""
    if settings.jwt_issuer is None:
        return None
    jwks = read_jwks(settings.jwt_jwks) if settings.jwt_jwks is not None else placeholder_jwks()
    return AuthOptions(
        issuer=settings.jwt_issuer,
        audiences=tuple(dict.fromkeys(settings.jwt_audiences)),
        jwks=jwks,
        claim_headers=tuple((claim, header.lower()) for claim, header in sorted(settings.jwt_claim_headers.items())),
        access_claim=settings.access_claim,
        admin_claim=settings.admin_claim,
    )


# -- the key set ------------------------------------------------------------------------------------


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_EC_CURVES = {"P-256": 32, "P-384": 48, "P-521": 66}
"""JWK curve name → coordinate size in bytes."""
_OKP_CURVES = ("Ed25519", "Ed448")


def _asymmetric() -> Any:
    """cryptography's asymmetric key module, imported when a key set is first checked: a gateway
    without JWT (or TLS) runs where cryptography is not installed."""
    try:
        # Optional dependency (the gateway extra); the submodules load with their package.
        from cryptography.hazmat.primitives import asymmetric  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa  # noqa: F401, PLC0415
    except ImportError as exc:  # pragma: no cover - the gateway extra installs it
        raise JwksError("JWT authentication needs the cryptography package (pip install 'sluice-mesh[gateway]')"
                        ) from exc
    return asymmetric


def _b64url_field(key: Resource, field: str, kty: str) -> bytes:
    """The bytes of the base64url (unpadded) member ``field`` of a JWK, or ValueError naming it."""
    value = key.get(field)
    if not isinstance(value, str) or not _B64URL_RE.fullmatch(value) or len(value) % 4 == 1:
        raise ValueError(f"{kty} key without a base64url \"{field}\"")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{kty} key without a base64url \"{field}\"") from exc


def _check_key(key: object) -> None:
    """ValueError saying why ``key`` is no public JWK a token can be checked with: the fields of its
    ``kty`` are decoded and the key is built (an EC point must lie on its curve, …)."""
    if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
        raise ValueError("not a JWK (an object with \"kty\")")
    kty = key["kty"]
    asymmetric = _asymmetric()
    if kty == "RSA":
        n = int.from_bytes(_b64url_field(key, "n", kty), "big")
        e = int.from_bytes(_b64url_field(key, "e", kty), "big")
        if n.bit_length() < 1024 or n.bit_length() > 16384:
            raise ValueError(f"RSA key of {n.bit_length()} bits (1,024 to 16,384)")
        asymmetric.rsa.RSAPublicNumbers(e, n).public_key()
    elif kty == "EC":
        crv = key.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise ValueError(f"EC key on curve {clip(str(crv))!r}, not one of {', '.join(_EC_CURVES)}")
        size = _EC_CURVES[crv]
        curve = {"P-256": asymmetric.ec.SECP256R1, "P-384": asymmetric.ec.SECP384R1,
                 "P-521": asymmetric.ec.SECP521R1}[crv]()
        x, y = _b64url_field(key, "x", kty), _b64url_field(key, "y", kty)
        if len(x) != size or len(y) != size:
            raise ValueError(f"EC {crv} key whose x or y is not {size} bytes")
        asymmetric.ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                 curve).public_key()
    elif kty == "OKP":
        crv = key.get("crv")
        if not isinstance(crv, str) or crv not in _OKP_CURVES:
            raise ValueError(f"OKP key on curve {clip(str(crv))!r}, not one of {', '.join(_OKP_CURVES)}")
        okp = asymmetric.ed25519.Ed25519PublicKey if crv == "Ed25519" else asymmetric.ed448.Ed448PublicKey
        okp.from_public_bytes(_b64url_field(key, "x", kty))
    elif kty == "oct":
        if not _b64url_field(key, "k", kty):
            raise ValueError("oct key with an empty \"k\"")
    else:
        raise ValueError(f"kty {clip(kty)!r} is not one of RSA, EC, OKP, oct")


def parse_jwks(raw: bytes, source: str) -> str:
    """The key set in ``raw`` as canonical JSON text, or :class:`JwksError` naming ``source``.

    Every key is checked in full (:func:`_check_key`): a key set Envoy would refuse is refused
    here, and the one in force stays.
    """
    if len(raw) > JWKS_MAX_BYTES:
        raise JwksError(f"{source}: larger than {JWKS_MAX_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JwksError(f"{source}: not JSON ({exc})") from exc
    except RecursionError as exc:
        raise JwksError(f"{source}: not JSON (nested too deeply)") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise JwksError(f"{source}: not a JWKS (a JSON object whose \"keys\" lists at least one key)")
    if len(keys) > JWKS_MAX_KEYS:
        raise JwksError(f"{source}: {len(keys)} keys, at most {JWKS_MAX_KEYS}")
    for index, key in enumerate(keys):
        try:
            _check_key(key)
        except (ValueError, TypeError, OverflowError) as exc:
            raise JwksError(f"{source}: key {index}: {exc}") from exc
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"))
    except RecursionError as exc:  # a key's other members nested too deeply
        raise JwksError(f"{source}: not JSON (nested too deeply)") from exc


def placeholder_jwks() -> str:
    """A key set no token can match (the private half is thrown away): what Envoy checks tokens
    with until the remote key set is first fetched. Envoy refuses a provider without any key."""
    ec = _asymmetric().ec
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    return json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "sluice-no-key-fetched-yet", "use": "sig",
                                 "alg": "ES256", "x": _b64url_uint(key.x), "y": _b64url_uint(key.y)}]},
                      sort_keys=True, separators=(",", ":"))


def _b64url_uint(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()


def read_jwks(path: Path) -> str:
    """The key set in the file ``path`` (see :func:`parse_jwks`)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(JWKS_MAX_BYTES + 1)
    except OSError as exc:
        raise JwksError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return parse_jwks(raw, str(path))


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is no JWKS URL (None: it is one)."""
    parts = urllib.parse.urlsplit(uri) if len(uri) <= 2048 else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{clip(uri)!r}: not an http:// or https:// URL"
    return None


def fetch_jwks(uri: str, timeout: float = 5.0) -> str:
    """The key set at ``uri`` (blocking: run it in a thread)."""
    request = urllib.request.Request(uri, headers={"accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read(JWKS_MAX_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # HTTPException: a broken answer (over 100 headers, a chunked body cut short, …).
        raise JwksError(f"{uri}: fetch failed ({type(exc).__name__}: {clip(str(exc))})") from exc
    return parse_jwks(raw, uri)


class JwksWatch:
    """Notices a new key set: the file changed (checked every call; renamed or rewritten files
    alike, a Kubernetes Secret's ``..data`` swap too) or the URI's refresh interval passed.

    A key set that cannot be used (a half-written file, an unreachable URI) is logged and the last
    good one stays in force, so a bad rotation never fails requests that the old keys pass.
    """

    def __init__(self, current: str, *, path: Path | None = None, uri: str | None = None,
                 refresh: float = 300.0, retry: float = 10.0) -> None:
        self.current = current
        self.path = path
        self.uri = uri
        self.refresh = refresh
        self.retry = retry
        self._signature: tuple[int, ...] | None = self._stat() if path is not None else None
        self._next_fetch = 0.0
        self._reported: str | None = None

    def _stat(self) -> tuple[int, ...] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load(self) -> str | None:
        """The key set if the source has a new one (blocking)."""
        if self.path is not None:
            signature = self._stat()
            if signature is None or signature == self._signature:
                return None
            text = read_jwks(self.path)
            self._signature = signature
            return text
        assert self.uri is not None
        if time.monotonic() < self._next_fetch:
            return None
        self._next_fetch = time.monotonic() + self.retry
        text = fetch_jwks(self.uri)
        self._next_fetch = time.monotonic() + self.refresh
        return text

    async def check(self) -> str | None:
        """The new key set, or None when it did not change (or the new one is unusable)."""
        try:
            try:
                text = await asyncio.to_thread(self._load)
            except JwksError:
                raise
            except Exception as exc:  # whatever a source does, the watch carries on
                raise JwksError(f"{self.path or self.uri}: unusable ({type(exc).__name__}: "
                                f"{clip(str(exc))})") from exc
        except JwksError as exc:
            if str(exc) != self._reported:
                self._reported = str(exc)
                log.warning("jwks_unusable", error=str(exc), keeping="the last good key set")
            return None
        self._reported = None
        if text is None or text == self.current:
            return None
        self.current = text
        log.info("jwks_changed", source=str(self.path or self.uri), keys=len(json.loads(text)["keys"]))
        return text

    async def run(self, on_change: Callable[[str], None], interval: float = 1.0) -> None:
        """Check now and every ``interval`` seconds; ``on_change(key set)`` for each new one."""
        while True:
            text = await self.check()
            if text is not None:
                on_change(text)
            await asyncio.sleep(interval)


def jwks_watch(settings: GatewaySettings, options: AuthOptions) -> JwksWatch:
    return JwksWatch(options.jwks, path=settings.jwt_jwks.absolute() if settings.jwt_jwks else None,
                     uri=settings.jwt_jwks_uri, refresh=settings.jwt_jwks_refresh)


JWT_CACHE_SIZE = 1024
"""Verified tokens Envoy keeps per worker thread (tokens over 4 KiB are never kept)."""

# -- filters ------------------------------------------------------------------------------------------


def auth_filters(auth: AuthOptions | None) -> list[Resource]:
    """The HTTP filters after body routing, before the rate limit and the router (none when off)."""
    if auth is None:
        return []
    provider: Resource = {
        "issuer": auth.issuer,
        "local_jwks": {"inline_string": auth.jwks},
        # Only the header: a token in a query parameter would land in access logs.
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False,
        "payload_in_metadata": PAYLOAD_KEY,
        "claim_to_headers": [{"header_name": header, "claim_name": claim} for claim, header in auth.claim_headers],
        # Verified tokens are kept (per worker, checked against exp on every hit), so a client
        # reusing its token pays the ES256/RS256 signature check once, not on every request.
        # A new key set comes with a new listener, and with it an empty cache.
        "jwt_cache_config": {"jwt_cache_size": JWT_CACHE_SIZE},
    }
    if auth.audiences:
        provider["audiences"] = list(auth.audiences)
    filters: list[Resource] = []
    if auth.claim_headers:
        filters.append({"name": STRIP_FILTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": header} for _, header in auth.claim_headers]}}})
    filters.append({"name": JWT_FILTER, "typed_config": {
        "@type": _JWT + "JwtAuthentication",
        "providers": {PROVIDER: provider},
        # Every path needs a token; the probes' routes turn it off (open_routes).
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": PROVIDER}}],
    }})
    # No filter-level rules: routes without a policy (the gateway's own answers) allow any caller
    # that jwt_authn let through; each model's routes carry their policy (protect_model_routes).
    filters.append({"name": RBAC_FILTER, "typed_config": {"@type": _RBAC + "RBAC"}})
    return filters


# -- per-route policies -----------------------------------------------------------------------------


def _claim_is(claim: str, value: str) -> Resource:
    """A principal whose claim is ``value`` or a list holding it."""
    def matcher(match: Resource) -> Resource:
        return {"sourced_metadata": {"metadata_matcher": {
            "filter": JWT_FILTER, "path": [{"key": PAYLOAD_KEY}, {"key": claim}], "value": match}}}
    exact = {"exact": value}
    return {"or_ids": {"ids": [matcher({"list_match": {"one_of": {"string_match": exact}}}),
                               matcher({"string_match": exact})]}}


def _repository_paths(model: str) -> Resource:
    """RepositoryModelLoad/Unload of ``model``: the gRPC methods and the REST endpoints."""
    rest = "/v2/repository/models/" + model.replace(".", r"\.") + "/(" + "|".join(REPOSITORY_OPERATIONS) + ")/?"
    rules: list[Resource] = [{"url_path": {"path": {"exact": _SERVICE_PATH + rpc}}} for rpc in REPOSITORY_RPCS]
    rules.append({"url_path": {"path": {"safe_regex": {"regex": rest}}}})
    return {"or_rules": {"rules": rules}}


def model_policy(model: str, access: AccessRule | None, auth: AuthOptions, *,
                 allow_repository_control: bool) -> Resource:
    """The RBACPerRoute of every route of ``model``.

    Calls: the access rule of the model's routing document, else the default rule (the access
    claim lists the model, or ``"*"``). Repository load/unload (only routed with
    ``allow_repository_control``): the admin claim is true, whatever the access claim says.
    """
    if access is None:
        principals = [_claim_is(auth.access_claim, model), _claim_is(auth.access_claim, ALL_MODELS)]
    elif ALL_MODELS in access.allow:
        principals = [{"any": True}]
    else:
        principals = [_claim_is(access.claim, value) for value in access.allow]
    repository = _repository_paths(model)
    policies: Resource = {"call": {"permissions": [{"not_rule": repository}], "principals": principals}}
    if allow_repository_control:
        policies["repository-admin"] = {"permissions": [repository], "principals": [{"sourced_metadata": {
            "metadata_matcher": {"filter": JWT_FILTER, "path": [{"key": PAYLOAD_KEY}, {"key": auth.admin_claim}],
                                 "value": {"bool_match": True}}}}]}
    return {"@type": _RBAC + "RBACPerRoute", "rbac": {"rules": {"action": "ALLOW", "policies": policies}}}


def protect_model_routes(routes: Sequence[Resource], model: str, access: AccessRule | None,
                         auth: AuthOptions | None, *, allow_repository_control: bool) -> list[Resource]:
    """``routes`` of ``model`` with its policy (unchanged when authentication is off).

    Every route of the model gets it, its direct answers too: those name the model's versions.
    """
    if auth is None:
        return list(routes)
    policy = model_policy(model, access, auth, allow_repository_control=allow_repository_control)
    claim = access.claim if access is not None else auth.access_claim
    protected = []
    for route in routes:
        per_filter = {**route.get("typed_per_filter_config", {}), RBAC_FILTER: policy}
        protected.append({**route, "typed_per_filter_config": per_filter,
                          "metadata": {"filter_metadata": {ROUTE_METADATA: {"model": model, "claim": claim}}}})
    return protected


def open_routes(routes: Sequence[Resource], auth: AuthOptions | None) -> list[Resource]:
    """``routes`` with the token requirement off on the probes' routes (:data:`OPEN_ROUTES`)."""
    if auth is None:
        return list(routes)
    disabled = {JWT_FILTER: {"@type": _JWT + "PerRouteConfig", "disabled": True}}
    return [{**route, "typed_per_filter_config": {**route.get("typed_per_filter_config", {}), **disabled}}
            if route.get("name") in OPEN_ROUTES else route for route in routes]


# -- what callers read --------------------------------------------------------------------------------


def auth_reply_mappers(auth: AuthOptions | None, *, allow_repository_control: bool = False) -> list[Resource]:
    """local_reply_config mappers for refused tokens and denied calls (none when off).

    jwt_authn answers 401 with its reason ("Jwt is expired", "Jwt verification fails", …) and 403
    for a wrong audience; both become 401 "authentication failed: <reason>" (gRPC clients read
    UNAUTHENTICATED). A 403 after a verified token is an RBAC denial: 403 naming the model and the
    claim (PERMISSION_DENIED), or, for repository load/unload, the admin claim. The one other 403
    after a verified token, the REST repository control refusal (only while it is off), is left
    as it is. REST requests (every content-type but gRPC's, or none) get ``{"error": …}``.
    """
    if auth is None:
        return []

    def status(code: int) -> Resource:
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": code, "runtime_key": f"sluice.auth_{code}"}}}}

    def path(match: Resource, *, invert: bool = False) -> Resource:
        return {"header_filter": {"header": {"name": ":path", "string_match": match, "invert_match": invert}}}

    def payload(present: bool) -> Resource:
        # null_match never matches a present payload: with match_if_key_not_found it means "absent".
        return {"metadata_filter": {"matcher": {"filter": JWT_FILTER, "path": [{"key": PAYLOAD_KEY}],
                                                "value": {"present_match": True} if present else {"null_match": {}}},
                                    "match_if_key_not_found": not present}}

    # gRPC or REST by content-type, as the routes tell them apart (a route's ``grpc: {}`` match:
    # application/grpc, alone or followed by "+" or ";"), so a REST request to a path outside /v2
    # gets JSON too. An absent content-type is REST: read as empty, it fails the inverted match.
    grpc_type = {"safe_regex": {"regex": "application/grpc([+;].*)?"}}
    grpc = {"header_filter": {"header": {"name": "content-type", "string_match": grpc_type}}}
    rest = {"header_filter": {"header": {"name": "content-type", "string_match": grpc_type, "invert_match": True,
                                         "treat_missing_header_as_empty": True}}}
    rest_repository = {"safe_regex": {"regex": "/v2/repository/models/[^/]+/(" + "|".join(REPOSITORY_OPERATIONS)
                                               + ")/?"}}
    repository = {"or_filter": {"filters": [
        *(path({"exact": _SERVICE_PATH + rpc}) for rpc in REPOSITORY_RPCS), path(rest_repository)]}}
    denied = [status(403), payload(True)]
    unauthenticated = {"or_filter": {"filters": [status(401), {"and_filter": {"filters": [status(403),
                                                                                          payload(False)]}}]}}
    model = "'%METADATA(ROUTE:sluice:model)%'"
    admin_text = f"permission denied: loading or unloading model {model} needs a token whose claim " \
                 f"'{auth.admin_claim}' is true"
    call_text = f"permission denied: model {model} may not be called with this token (its claim " \
                "'%METADATA(ROUTE:sluice:claim)%' does not allow the model)"
    authn_text = "authentication failed: %LOCAL_REPLY_BODY%"

    def mapper(conditions: list[Resource], text: str, *, as_json: bool, code: int | None = None) -> Resource:
        body: Resource = ({"json_format": {"error": text}} if as_json
                          else {"text_format_source": {"inline_string": text}})
        found: Resource = {"filter": {"and_filter": {"filters": conditions}}, "body_format_override": body}
        if code is not None:
            found["status_code"] = code
        return found

    mappers: list[Resource] = []
    if allow_repository_control:
        mappers += [mapper([*denied, repository, rest], admin_text, as_json=True),
                    mapper([*denied, repository, grpc], admin_text, as_json=False)]
    else:
        denied.append(path(rest_repository, invert=True))  # the gateway's own refusal stays
    return [
        *mappers,
        mapper([*denied, rest], call_text, as_json=True),
        mapper([*denied, grpc], call_text, as_json=False),
        mapper([unauthenticated, rest], authn_text, as_json=True, code=401),
        mapper([unauthenticated, grpc], authn_text, as_json=False, code=401),
    ]
