"""The PEM checks every TLS flag goes through (mesh/tls_files.py), on real files of the dev PKI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mesh.devstack.pki import DevPki, ensure_dev_pki
from mesh.tls_files import MAX_PEM_BYTES, TlsFileError, read_ca, read_key_pair, read_server_files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("pki") / "pki")


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
