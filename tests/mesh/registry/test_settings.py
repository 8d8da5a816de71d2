from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mesh.registry.settings import EtcdSettings, parse_endpoint


def test_defaults() -> None:
    settings = EtcdSettings()
    assert settings.endpoints == ["127.0.0.1:2379"]
    assert settings.prefix == "/sluice/"
    assert settings.lease_ttl == 10
    assert not settings.use_tls


def test_environment_fills_in_and_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_ETCD_ENDPOINTS", "10.0.0.1:2379, 10.0.0.2:2379")
    monkeypatch.setenv("SLUICE_ETCD_PREFIX", "/prod")
    monkeypatch.setenv("SLUICE_ETCD_LEASE_TTL", "15")
    monkeypatch.setenv("SLUICE_ETCD_USERNAME", "svc")
    monkeypatch.setenv("SLUICE_ETCD_PASSWORD", "s3cret")
    settings = EtcdSettings(prefix="/staging/")
    assert settings.endpoints == ["10.0.0.1:2379", "10.0.0.2:2379"]
    assert settings.prefix == "/staging/"
    assert settings.lease_ttl == 15
    assert settings.password is not None and settings.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_pairs_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cert and key go together"):
        EtcdSettings(cert=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="username and password go together"):
        EtcdSettings(username="u")


def test_tls_is_on_with_a_ca_or_https(tmp_path: Path) -> None:
    assert EtcdSettings(ca_cert=tmp_path / "ca.pem").use_tls
    assert EtcdSettings(endpoints=["https://etcd:2379"]).use_tls


@pytest.mark.parametrize("endpoint", ["etcd", "etcd:", ":2379", "etcd:99999", "etcd:port"])
def test_bad_endpoints_are_rejected(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="is not host:port"):
        EtcdSettings(endpoints=[endpoint])


def test_parse_endpoint() -> None:
    assert parse_endpoint("http://127.0.0.1:2379/") == ("127.0.0.1", 2379, False)
    assert parse_endpoint("https://[::1]:2379") == ("::1", 2379, True)
    assert parse_endpoint("etcd.local:2379") == ("etcd.local", 2379, None)


def test_lease_ttl_bounds() -> None:
    with pytest.raises(ValidationError, match="lease_ttl"):
        EtcdSettings(lease_ttl=1)
