"""The gateway's TLS settings are checked before anything starts: one line naming the flag, exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings
from mesh.devstack.pki import DevPki
from tests.fixtures.service import sluice_argv


def test_good_files_are_accepted(pki: DevPki) -> None:
    settings = GatewaySettings(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key, tls_client_ca=pki.ca.cert,
                               upstream_tls_ca=pki.ca.cert, upstream_tls_cert=pki.gateway_client.cert,
                               upstream_tls_key=pki.gateway_client.key)
    assert settings.tls_client_ca == pki.ca.cert


@pytest.mark.parametrize(("given", "message"), [
    ({"tls_cert": "gateway.crt"}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": "ca.crt"}, "--tls-client-ca needs --tls-cert and --tls-key"),
    ({"tls_cert": "gateway.crt", "tls_key": "service.key"}, "does not belong to --tls-cert"),
    ({"tls_cert": "missing.crt", "tls_key": "gateway.key"}, "--tls-cert {dir}/missing.crt: No such file"),
    ({"tls_cert": "gateway.key", "tls_key": "gateway.key"}, "not PEM"),
    ({"tls_cert": "gateway.crt", "tls_key": "gateway.key", "tls_client_ca": "jwks.json"}, "--tls-client-ca"),
    ({"upstream_tls_ca": "ca.crt", "upstream_tls_cert": "gateway-client.crt", "upstream_tls_key": "client.key"},
     "--upstream-tls-key"),
    ({"upstream_tls_ca": "ca.key"}, "--upstream-tls-ca"),
])
def test_bad_files_are_refused_naming_the_flag(pki: DevPki, given: dict[str, str], message: str) -> None:
    fields = {name: pki.directory / value for name, value in given.items()}
    with pytest.raises(ValidationError, match=message.format(dir=pki.directory)):
        GatewaySettings(**fields)  # type: ignore[arg-type]


def test_sluice_gateway_stops_with_one_line_and_exit_2(pki: DevPki, tmp_path: Path) -> None:
    done = subprocess.run(sluice_argv("gateway", "--tls-cert", str(pki.gateway.cert), "--tls-key",
                                      str(pki.service.key), "--xds-dir", str(tmp_path / "xds")),
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--tls-key" in lines[0] and "does not belong to --tls-cert" in lines[0], lines
    assert not (tmp_path / "xds").exists()
