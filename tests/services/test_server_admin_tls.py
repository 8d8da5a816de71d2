"""``sluice serve`` with admin TLS files the settings accepted that cannot serve HTTPS by the time
the server starts (changed or removed since): one error naming the admin TLS flags, not a taken
metrics port. In process, before any port is bound; the CLI maps it to exit status 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mesh.devstack.pki import DevPki
from mesh.ports import free_port
from mesh.tls_files import TlsFileError
from services.server import ModelServer
from services.settings import ServiceSettings

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("broken", ["cert", "client_ca", "removed"])
async def test_a_tls_file_problem_at_start_names_the_tls_flags_not_the_port(pki: DevPki, tmp_path: Path,
                                                                           broken: str) -> None:
    cert, key, client_ca = (tmp_path / "admin.crt", tmp_path / "admin.key", tmp_path / "admin-ca.crt")
    for source, copy in ((pki.service.cert, cert), (pki.service.key, key), (pki.admin_ca.cert, client_ca)):
        shutil.copyfile(source, copy)
    (tmp_path / "repo").mkdir()
    settings = ServiceSettings(repo=tmp_path / "repo", port=free_port(), metrics_port=free_port(), rest_port=-1,
                               admin_tls_cert=cert, admin_tls_key=key, admin_tls_client_ca=client_ca)
    if broken == "removed":
        cert.unlink()
    else:
        (cert if broken == "cert" else client_ca).write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    server = ModelServer(settings)
    with pytest.raises(TlsFileError) as refused:
        await server.start()
    message = str(refused.value)
    assert "--admin-tls-cert/--admin-tls-key and --admin-tls-client-ca" in message, message
    assert "cannot listen" not in message and "\n" not in message
    assert server.metrics_port is None
