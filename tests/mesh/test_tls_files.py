"""The PEM checks every TLS flag goes through (mesh/tls_files.py), on real files of the dev PKI."""

from __future__ import annotations

import datetime
import os
import re
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from mesh.devstack.pki import DevPki
from mesh.tls_files import (
    MAX_PEM_BYTES,
    ReloadingContext,
    TlsFileError,
    read_ca,
    read_key_pair,
    read_server_files,
    validity,
)


def test_a_matching_pair_and_ca_are_read(pki: DevPki) -> None:
    cert, key, ca = read_server_files(pki.gateway.cert, pki.gateway.key, pki.ca.cert) or (b"", b"", None)
    assert cert == pki.gateway.cert.read_bytes() and key == pki.gateway.key.read_bytes()
    assert ca == pki.ca.cert.read_bytes()
    assert read_server_files(None, None, None) is None


@pytest.mark.parametrize(("which", "expected"), [
    ("missing", "--gw-cert {cert}: No such file"),
    ("not-pem", "--gw-cert {cert}: not PEM"),
    ("other-key", "--gw-key {key} does not belong to --gw-cert {cert}"),
    ("huge", "more than a PEM file of"),
])
def test_a_bad_pair_is_refused_naming_the_flag(pki: DevPki, tmp_path: Path, which: str, expected: str) -> None:
    cert, key = tmp_path / "c.pem", pki.gateway.key
    if which == "not-pem":
        cert.write_text("hello")
    elif which == "other-key":
        cert.write_bytes(pki.service.cert.read_bytes())
    elif which == "huge":
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * MAX_PEM_BYTES)
    with pytest.raises(TlsFileError, match=re.escape(expected.format(cert=cert, key=key))):
        read_key_pair(cert, key, "--gw-cert", "--gw-key")


def test_a_ca_that_is_no_certificate_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(TlsFileError, match=r"^--ca "):
        read_ca(bad, "--ca")


def test_flags_that_do_not_go_together(pki: DevPki) -> None:
    with pytest.raises(TlsFileError, match="--x-client-ca needs --x-cert and --x-key"):
        read_server_files(None, None, pki.ca.cert, flag="--x")
    with pytest.raises(TlsFileError, match="--tls-cert and --tls-key go together"):
        read_server_files(pki.gateway.cert, None, None)


def _issue(pki: DevPki, tmp_path: Path, *, start: datetime.timedelta, end: datetime.timedelta,
           password: bytes | None = None) -> tuple[Path, Path, x509.Certificate]:
    """A pair signed by the dev CA, valid from now + ``start`` to now + ``end``."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")]))
             .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now + start).not_valid_after(now + end).sign(ca_key, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(password) if password is not None
                  else serialization.NoEncryption())
    cert, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert, key_path, built


DAY = datetime.timedelta(days=1)


@pytest.mark.parametrize(("start", "end", "expected"), [
    (-2 * DAY, -DAY, "the certificate expired at "),
    (DAY, 2 * DAY, "the certificate is not valid before "),
])
def test_a_certificate_outside_its_validity_window_is_refused(pki: DevPki, tmp_path: Path, start: datetime.timedelta,
                                                              end: datetime.timedelta, expected: str) -> None:
    cert, key, _ = _issue(pki, tmp_path, start=start, end=end)
    with pytest.raises(TlsFileError, match=re.escape(f"--gw-cert {cert}: {expected}")):
        read_key_pair(cert, key, "--gw-cert", "--gw-key")


def test_a_certificate_issued_a_moment_ahead_of_this_clock_is_taken(pki: DevPki, tmp_path: Path) -> None:
    cert, key, _ = _issue(pki, tmp_path, start=datetime.timedelta(seconds=30), end=DAY)
    assert read_key_pair(cert, key, "--gw-cert", "--gw-key")[0] == cert.read_bytes()


def test_validity_reads_the_dates_the_certificate_carries(pki: DevPki, tmp_path: Path) -> None:
    _, _, built = _issue(pki, tmp_path, start=-DAY, end=400 * DAY)  # both UTCTime
    not_before, not_after = validity(built.public_bytes(serialization.Encoding.DER))
    assert (not_before, not_after) == (built.not_valid_before_utc.timestamp() // 1,
                                       built.not_valid_after_utc.timestamp() // 1)
    _, _, later = _issue(pki, tmp_path, start=-DAY, end=30000 * DAY)  # after 2049: GeneralizedTime
    assert validity(later.public_bytes(serialization.Encoding.DER))[1] == later.not_valid_after_utc.timestamp() // 1
    with pytest.raises(ValueError):
        validity(b"\x30\x03\x02\x01")


def test_a_passphrase_protected_key_is_refused_without_a_prompt(pki: DevPki, tmp_path: Path) -> None:
    cert, key, _ = _issue(pki, tmp_path, start=-DAY, end=DAY, password=b"secret")
    with pytest.raises(TlsFileError, match=re.escape(f"--gw-key {key}: the key is protected by a passphrase")):
        read_key_pair(cert, key, "--gw-cert", "--gw-key")


def _replace(target: Path, data: bytes) -> None:
    """A renewal as a mounted Secret sees it: new bytes renamed over the file (a new inode)."""
    staged = target.with_name(f".{target.name}.new")
    staged.write_bytes(data)
    os.replace(staged, target)


def test_a_reloading_context_follows_renewals_and_keeps_the_last_good_one(pki: DevPki, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.cert.read_bytes())
    made: list[ssl.SSLContext] = []

    def make() -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=read_ca(ca, "--test-ca").decode())
        made.append(context)
        return context

    tls = ReloadingContext([ca], make, interval=0.0, events=("test_reloaded", "test_refused"))
    first = tls()
    assert made == [first] and tls() is first  # unchanged files: not made again

    with capture_logs() as logs:
        _replace(ca, b"not a certificate\n")
        assert tls() is first and tls() is first  # refused, the old context stays
        assert len(made) == 1
        _replace(ca, pki.admin_ca.cert.read_bytes())  # renewed again: tried again, taken
        renewed = tls()
    assert renewed is not first and made[-1] is renewed and tls() is renewed
    events = [entry["event"] for entry in logs]
    assert events == ["test_refused", "test_reloaded"]  # the broken set is logged once
    assert logs[0]["reason"].startswith(f"--test-ca {ca}: not PEM") and logs[1]["files"] == [str(ca)]


def test_a_reloading_context_looks_at_the_files_once_per_interval(pki: DevPki, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.cert.read_bytes())
    tls = ReloadingContext([ca], lambda: ssl.create_default_context(cafile=str(ca)), interval=3600.0)
    first = tls()
    _replace(ca, pki.admin_ca.cert.read_bytes())
    assert tls() is first  # within the interval the stamps are not looked at


def test_a_reloading_context_refuses_unusable_files_at_the_start(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("hello")
    with pytest.raises(TlsFileError, match=re.escape(f"--test-ca {ca}: not PEM")):
        ReloadingContext([ca], lambda: ssl.create_default_context(cadata=read_ca(ca, "--test-ca").decode()))
