"""Renewed certificates for rotation tests, signed by the dev PKI's CA (mesh/devstack/pki.py)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh.devstack.pki import DevPki, Pair


def issue_pair(pki: DevPki, cert: Path, key: Path) -> int:
    """A new certificate for localhost/127.0.0.1 signed by the dev CA (no key usage limits: a server
    or a client certificate), written over ``cert`` and ``key`` (each replaced by rename, one after
    the other, as a renewal does); returns its serial."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    new_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = x509.random_serial_number()
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    built = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renewed")]))
             .issuer_name(ca_cert.subject).public_key(new_key.public_key()).serial_number(serial)
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName(names), critical=False)
             .sign(ca_key, hashes.SHA256()))
    for path, data in ((cert, built.public_bytes(serialization.Encoding.PEM)),
                       (key, new_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))):
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return serial


def copied_pair(pair: Pair, directory: Path, cert_name: str, key_name: str) -> tuple[Path, Path]:
    """Copies of ``pair`` in ``directory`` (cert, key), for a test that renews them in place."""
    cert, key = directory / cert_name, directory / key_name
    shutil.copy(pair.cert, cert)
    shutil.copy(pair.key, key)
    return cert, key
