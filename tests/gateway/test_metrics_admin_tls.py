"""The gateway controller's admin identity (``sluice gateway --admin-tls-client-ca``): its
metrics port (``/metrics`` and ``/debug/``) speaks HTTPS and answers only a client certificate of
the admin CA. Real handshakes against the controller's own metrics server; the whole `sluice
gateway` process under `sluice up --secure` is tested in tests/mesh/devstack/test_posture.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.metrics import GatewayMetrics, admin_tls
from gateway.settings import GatewaySettings
from mesh.devstack.pki import DevPki
from tests.fixtures.pki import check_admin_only, client_context

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("own_certificate", [False, True], ids=["listener-cert", "admin-tls-cert"])
def test_the_metrics_port_answers_only_the_admin_identity(pki: DevPki, own_certificate: bool) -> None:
    files = ({"admin_tls_cert": pki.service.cert, "admin_tls_key": pki.service.key} if own_certificate
             else {"tls_cert": pki.gateway.cert, "tls_key": pki.gateway.key})
    settings = GatewaySettings(admin_tls_client_ca=pki.admin_ca.cert, **files)  # type: ignore[arg-type]
    metrics = GatewayMetrics()
    port = metrics.serve("127.0.0.1", 0, tls=admin_tls(settings))
    try:
        admin = client_context(pki.ca.cert, (pki.admin.cert, pki.admin.key))
        no_certificate = client_context(pki.ca.cert)
        other_ca = client_context(pki.ca.cert, (pki.client.cert, pki.client.key))  # a valid pair of another CA
        check_admin_only(port, admin, [no_certificate, other_ca], "sluice_gateway_publishes")
    finally:
        assert metrics.admin is not None
        metrics.admin.close()


def test_without_the_admin_ca_the_metrics_port_stays_plain(pki: DevPki) -> None:
    settings = GatewaySettings(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key)
    assert admin_tls(settings) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"admin_tls_client_ca": "{admin_ca}"},
     "--admin-tls-client-ca needs --admin-tls-cert and --admin-tls-key, or --tls-cert and --tls-key"),
    ({"admin_tls_cert": "{cert}", "admin_tls_key": "{key}"}, "need --admin-tls-client-ca"),
    ({"admin_tls_cert": "{cert}", "admin_tls_client_ca": "{admin_ca}"}, "go together"),
    ({"admin_tls_cert": "{cert}", "admin_tls_key": "{other_key}", "admin_tls_client_ca": "{admin_ca}"},
     "--admin-tls-key"),
    ({"tls_cert": "{cert}", "tls_key": "{key}", "admin_tls_client_ca": "{key}"}, "--admin-tls-client-ca"),
    ({"tls_cert": "{cert}", "tls_key": "{key}", "admin_tls_client_ca": "{missing}"}, "No such file"),
])
def test_unusable_admin_files_are_refused_naming_the_flag(pki: DevPki, tmp_path: Path, fields: dict[str, str],
                                                          message: str) -> None:
    paths = {"{admin_ca}": pki.admin_ca.cert, "{cert}": pki.gateway.cert, "{key}": pki.gateway.key,
             "{other_key}": pki.client.key, "{missing}": tmp_path / "nope.crt"}
    values: dict[str, Any] = {name: paths[value] for name, value in fields.items()}
    with pytest.raises(ValidationError) as refused:
        GatewaySettings(**values)
    assert message in str(refused.value)
