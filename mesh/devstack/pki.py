"""A throwaway certificate authority for ``sluice up --secure``: everything TLS and JWT need on
one machine, made under the run directory and never used anywhere else.

Production brings its own issuer and certificates (cert-manager, a corporate CA); this only saves
a developer from running openssl by hand. What it makes, under ``<run-dir>/pki/``:

* ``ca.crt`` / ``ca.key``: the CA that signs every certificate below (what ``SLUICE_CA`` names);
* ``gateway.crt`` / ``gateway.key``: the gateway listener's server certificate;
* ``service.crt`` / ``service.key``: the model services' server certificate;
* ``gateway-client.crt`` / ``gateway-client.key``: the certificate Envoy presents to the services
  (mTLS), its SAN ``spiffe://sluice.local/gateway``;
* ``client.crt`` / ``client.key``: a client certificate for callers of an mTLS listener;
* ``admin-ca.crt`` / ``admin-ca.key``: a CA of its own for the admin identity (the services' and
  the gateway controller's ``--admin-tls-client-ca``), so that no certificate above opens an
  admin port;
* ``admin.crt`` / ``admin.key``: the admin identity it signs, SAN ``spiffe://sluice.local/admin``
  (what ``sluice debug`` presents via ``SLUICE_ADMIN_CERT``/``_KEY`` and the rollout controller
  scrapes the services' ``/metrics`` with);
* ``jwt.key`` / ``jwks.json``: the ES256 key that ``sluice token`` signs with, and its public half
  as the JWKS that the gateway verifies tokens with.

Server certificates name ``localhost`` and ``127.0.0.1``: the stack listens on loopback only. Keys
are written with mode 0600. Files that exist and stay valid for more than a day are kept, so
tokens and certificates handed out by an earlier ``up`` of the same run directory keep working.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)
RENEW_BEFORE = datetime.timedelta(days=1)
GATEWAY_CLIENT_SAN = "spiffe://sluice.local/gateway"
CLIENT_SAN = "spiffe://sluice.local/client"
ADMIN_SAN = "spiffe://sluice.local/admin"
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
JWT_KEY_ID = "sluice-dev"


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as file paths."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """The files of one run directory's throwaway PKI."""

    directory: Path
    ca: Pair
    gateway: Pair
    service: Pair
    gateway_client: Pair
    client: Pair
    admin_ca: Pair
    """Signs the admin identity only (``--admin-tls-client-ca``)."""
    admin: Pair
    """The admin identity: a client certificate of :attr:`admin_ca`."""
    jwt_key: Path
    jwks: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    """Write ``data`` to ``path`` atomically; secrets are 0600 from the first byte."""
    temporary = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(temporary, flags, 0o600 if secret else 0o644)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def _still_valid(pair: Pair, issuer: x509.Certificate | None) -> bool:
    """The pair exists, parses, is signed by ``issuer`` (None: self-signed) and has a day left."""
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = _load_key(pair.key)
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    if public.public_numbers() != key.public_key().public_numbers():
        return False
    signer = issuer if issuer is not None else cert
    try:
        cert.verify_directly_issued_by(signer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _builder(subject: str, issuer: x509.Name | None, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sluice dev stack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer if issuer is not None else name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY))


def _make_ca(pair: Pair, subject: str = "sluice dev CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    cert = (_builder(subject, None, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(pair.key, _key_bytes(key), secret=True)
    _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False)
    return cert, key


def _make_leaf(pair: Pair, subject: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], *,
               server: bool, uris: tuple[str, ...] = ()) -> None:
    ca_cert, ca_key = ca
    key = _new_key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        names += [x509.DNSName(name) for name in LOOPBACK_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in LOOPBACK_ADDRESSES]
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (_builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(pair.key, _key_bytes(key), secret=True)
    _write(pair.cert, cert.public_bytes(serialization.Encoding.PEM), secret=False)


def _b64url_uint(value: int, length: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode()


def jwks_of(key: ec.EllipticCurvePrivateKey, key_id: str = JWT_KEY_ID) -> dict[str, object]:
    """The public half of an ES256 key as a JWKS document."""
    numbers = key.public_key().public_numbers()
    return {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": key_id,
                      "x": _b64url_uint(numbers.x, 32), "y": _b64url_uint(numbers.y, 32)}]}


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The ES256 signing key at ``path`` (what ``sluice token`` signs with)."""
    return _load_key(path)


def _ensure_ca(pair: Pair, subject: str) -> tuple[tuple[x509.Certificate, ec.EllipticCurvePrivateKey], bool]:
    """The CA of ``pair`` (made anew unless still valid) and whether it was made anew."""
    if not _still_valid(pair, None):
        return _make_ca(pair, subject), True
    return (x509.load_pem_x509_certificate(pair.cert.read_bytes()), _load_key(pair.key)), False


def ensure_dev_pki(directory: Path) -> DevPki:
    """Make (or keep, while valid) the throwaway PKI under ``directory``; see the module docstring."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)

    def pair(name: str) -> Pair:
        return Pair(directory / f"{name}.crt", directory / f"{name}.key")

    pki = DevPki(directory=directory, ca=pair("ca"), gateway=pair("gateway"), service=pair("service"),
                 gateway_client=pair("gateway-client"), client=pair("client"), admin_ca=pair("admin-ca"),
                 admin=pair("admin"), jwt_key=directory / "jwt.key", jwks=directory / "jwks.json")
    ca, renewed = _ensure_ca(pki.ca, "sluice dev CA")
    leaves = ((pki.gateway, "sluice gateway", True, ()),
              (pki.service, "sluice service", True, ()),
              (pki.gateway_client, "sluice gateway client", False, (GATEWAY_CLIENT_SAN,)),
              (pki.client, "sluice client", False, (CLIENT_SAN,)))
    for leaf, subject, server, uris in leaves:
        if renewed or not _still_valid(leaf, ca[0]):
            _make_leaf(leaf, subject, ca, server=server, uris=uris)
    admin_ca, admin_renewed = _ensure_ca(pki.admin_ca, "sluice dev admin CA")
    if admin_renewed or not _still_valid(pki.admin, admin_ca[0]):
        _make_leaf(pki.admin, "sluice admin", admin_ca, server=False, uris=(ADMIN_SAN,))
    try:
        signing = _load_key(pki.jwt_key)
    except (OSError, ValueError):
        signing = _new_key()
        _write(pki.jwt_key, _key_bytes(signing), secret=True)
    _write(pki.jwks, json.dumps(jwks_of(signing), indent=2).encode() + b"\n", secret=False)
    return pki
