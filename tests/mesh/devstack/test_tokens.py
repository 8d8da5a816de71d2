"""Tokens of the development stack: minted with the PKI's key, verified against its JWKS."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.devstack.pki import ensure_dev_pki, load_signing_key
from mesh.devstack.tokens import TokenError, mint, parse_ttl, verify


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> ec.EllipticCurvePrivateKey:
    return load_signing_key(ensure_dev_pki(tmp_path_factory.mktemp("run") / "pki").jwt_key)


def _public_from_jwks(path: Path) -> ec.EllipticCurvePublicKey:
    (entry,) = json.loads(path.read_text())["keys"]

    def number(field: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(entry[field] + "=="), "big")

    return ec.EllipticCurvePublicNumbers(number("x"), number("y"), ec.SECP256R1()).public_key()


def test_a_minted_token_verifies_against_the_jwks(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    token = mint(load_signing_key(pki.jwt_key), subject="alice", models=["iris"], ttl=600, now=1000)
    claims = verify(token, _public_from_jwks(pki.jwks), now=1100)
    assert claims["sub"] == "alice" and claims["models"] == ["iris"] and claims["admin"] is False
    assert claims["exp"] == 1600


def test_each_failing_part_is_named(key: ec.EllipticCurvePrivateKey) -> None:
    public = key.public_key()
    token = mint(key, subject="bob", models=["iris"], ttl=60, now=1000)
    with pytest.raises(TokenError, match="expired"):
        verify(token, public, now=2000)
    with pytest.raises(TokenError, match="wrong audience"):
        verify(token, public, now=1000, audience="other")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TokenError, match="bad signature"):
        verify(token, other, now=1000)
    header, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["models"] = ["secret"]
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="bad signature"):
        verify(f"{header}.{forged_payload}.{signature}", public, now=1000)
    with pytest.raises(TokenError, match="three"):
        verify("abc", public)


def test_bad_input_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(TokenError, match="not a model name"):
        mint(key, subject="x", models=["../etc"])
    for text, seconds in (("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)):
        assert parse_ttl(text) == seconds
    for text in ("", "h", "-1h", "1.5h", "31d", "0"):
        with pytest.raises(TokenError, match="TTL"):
            parse_ttl(text)
