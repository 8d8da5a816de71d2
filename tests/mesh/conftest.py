"""Fixtures for the registry tests: settings and a connected client against a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.settings import EtcdSettings
from tests.fixtures.etcd import EtcdServer


def settings_for(server: EtcdServer, prefix: str = "/sluice/", **overrides: object) -> EtcdSettings:
    """Short timeouts and a 2 s lease so that outage tests finish quickly."""
    values: dict[str, object] = {"endpoints": [server.endpoint], "prefix": prefix, "lease_ttl": 2,
                                 "connect_timeout": 2.0, "request_timeout": 2.0}
    values.update(overrides)
    return EtcdSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_etcd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from the developer's SLUICE_ETCD_… environment."""
    import os

    for name in list(os.environ):
        if name.startswith("SLUICE_ETCD_"):
            monkeypatch.delenv(name)


@pytest.fixture
def settings(shared_etcd: EtcdServer, etcd_prefix: str) -> EtcdSettings:
    return settings_for(shared_etcd, etcd_prefix)


@pytest.fixture
def schema(settings: EtcdSettings) -> KeySchema:
    return KeySchema(settings.prefix)


@pytest.fixture
async def client(settings: EtcdSettings) -> AsyncIterator[EtcdClient]:
    etcd_client = EtcdClient(settings)
    await etcd_client.connect()
    try:
        yield etcd_client
    finally:
        await etcd_client.close()
