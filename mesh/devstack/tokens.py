"""JSON Web Tokens for the development stack: ``sluice token`` signs them with the key that
``sluice up --secure`` made (mesh/devstack/pki.py), and the gateway verifies them with its JWKS.

Only what the stack needs: compact JWS with ES256 (ECDSA P-256, SHA-256), the registered claims
``iss``, ``sub``, ``aud``, ``iat``, ``nbf``, ``exp``, and the claims the gateway authorizes on
(``models``, a list of model names, and ``admin``). :func:`verify` exists for tests and for
``sluice token --check``; the gateway does its own verification (Envoy's jwt_authn).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from mesh.devstack.pki import JWT_KEY_ID
from mesh.protocol import is_model_name

ISSUER = "sluice-dev"
AUDIENCE = "sluice"
MODELS_CLAIM = "models"
ADMIN_CLAIM = "admin"
MAX_TTL = 30 * 24 * 3600
MAX_TOKEN_BYTES = 8192
"""Largest token :func:`verify` reads (Envoy's default header limit is 60 KiB; tokens are small)."""


class TokenError(ValueError):
    """A token could not be made or does not verify; the message says which part failed."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise TokenError(f"the token's {what} is not base64url") from exc


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h`` or ``2d`` as seconds (1 s to 30 days)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    number = value[:-1] if scale is not None else value
    if not number.isdigit():
        raise TokenError(f"TTL {text!r}: write a whole number with an optional unit s, m, h or d (e.g. 1h)")
    seconds = int(number) * (scale or 1)
    if not 0 < seconds <= MAX_TTL:
        raise TokenError(f"TTL {text!r}: must be between 1 s and 30 days")
    return seconds


def mint(key: ec.EllipticCurvePrivateKey, *, subject: str, models: Sequence[str] = (), admin: bool = False,
         ttl: int = 3600, issuer: str = ISSUER, audience: str = AUDIENCE, key_id: str = JWT_KEY_ID,
         now: float | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """A signed ES256 token for ``subject`` that may call ``models`` (and the admin RPCs if ``admin``)."""
    for model in models:
        if not is_model_name(model):
            raise TokenError(f"{model!r} is not a model name")
    if not subject or len(subject) > 256:
        raise TokenError("the subject must be 1 to 256 characters")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": issuer, "sub": subject, "aud": audience, "iat": issued, "nbf": issued,
                              "exp": issued + ttl, MODELS_CLAIM: list(models), ADMIN_CLAIM: admin}
    if extra:
        claims.update(extra)
    header = {"alg": "ES256", "typ": "JWT", "kid": key_id}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def verify(token: str, public_key: ec.EllipticCurvePublicKey, *, audience: str = AUDIENCE,
           issuer: str = ISSUER, now: float | None = None, leeway: int = 60) -> dict[str, Any]:
    """The claims of ``token`` if it is signed by ``public_key`` and valid now; else TokenError."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("the token is not three dot-separated parts (header.payload.signature)")
    try:
        header = json.loads(_unb64url(parts[0], "header"))
        claims = json.loads(_unb64url(parts[1], "payload"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenError("the token's header or payload is not JSON") from exc
    if not isinstance(header, dict) or header.get("alg") != "ES256":
        raise TokenError("the token's algorithm is not ES256")
    if not isinstance(claims, dict):
        raise TokenError("the token's payload is not a JSON object")
    signature = _unb64url(parts[2], "signature")
    if len(signature) != 64:
        raise TokenError("bad signature: not 64 bytes")
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise TokenError("bad signature") from exc
    moment = time.time() if now is None else now
    if claims.get("iss") != issuer:
        raise TokenError(f"wrong issuer {claims.get('iss')!r} (want {issuer!r})")
    audiences = claims.get("aud")
    if audience not in (audiences if isinstance(audiences, list) else [audiences]):
        raise TokenError(f"wrong audience {audiences!r} (want {audience!r})")
    expires = claims.get("exp")
    if not isinstance(expires, int) or moment > expires + leeway:
        raise TokenError("expired")
    not_before = claims.get("nbf", 0)
    if not isinstance(not_before, int) or moment + leeway < not_before:
        raise TokenError("not valid yet")
    return claims
