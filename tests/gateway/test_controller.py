"""The gateway controller's own measurements, against a real etcd (no Envoy needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.controller import GatewayController
from gateway.settings import GatewaySettings
from mesh.registry.keys import KeySchema
from mesh.registry.settings import EtcdSettings
from mesh.registry.state import build_state
from tests.fixtures.etcd import EtcdServer


@pytest.mark.timeout(60)
async def test_watch_lag_counts_from_the_first_undelivered_write(shared_etcd: EtcdServer, tmp_path: Path) -> None:
    prefix = "/sluice-test/controller-lag/"
    controller = GatewayController(GatewaySettings(xds_dir=tmp_path / "xds", metrics_port=-1),
                                   EtcdSettings(endpoints=[shared_etcd.endpoint], prefix=prefix))
    schema = KeySchema(prefix)
    client = controller._client
    await client.connect()
    try:
        revision = await client.put(schema.routing("iris"), b'{"weights": {"1": 100}}')
        snapshot = await client.get_prefix(schema.models_prefix)
        controller.control.state = build_state(schema, snapshot.revision, snapshot.items)
        assert await controller.measure_watch_lag() == 0.0  # caught up

        newer = await client.put(schema.routing("iris"), b'{"weights": {"1": 50, "2": 50}}')
        assert newer > revision
        assert await controller.measure_watch_lag() < 0.1  # just noticed: behind since now
        await asyncio.sleep(0.3)
        lag = await controller.measure_watch_lag()
        assert 0.25 <= lag < 10
        assert controller.metrics.prometheus_registry.get_sample_value("sluice_gateway_watch_lag_seconds") == lag

        snapshot = await client.get_prefix(schema.models_prefix)  # what the watch would deliver
        controller.control.state = build_state(schema, snapshot.revision, snapshot.items)
        assert await controller.measure_watch_lag() == 0.0
    finally:
        await client.delete_prefix(prefix)
        await client.close()
