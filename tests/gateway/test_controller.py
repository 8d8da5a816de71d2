"""The gateway controller in process, against a real etcd: its own measurements (no Envoy needed)
and the key set it keeps when a real Envoy refuses a new one; the plans of a render that equals the
live config (nothing to publish, no process needed)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import JWT_FILTER, PROVIDER
from gateway.controller import GatewayController
from gateway.errors import GatewayError
from gateway.render import render_snapshot
from gateway.settings import GatewaySettings
from gateway.status import status_documents
from mesh.devstack.pki import DevPki, jwks_of
from mesh.ports import free_port
from mesh.registry.etcd import EtcdClient
from mesh.registry.etcd.client import KeyValue
from mesh.registry.keys import KeySchema
from mesh.registry.records import InstanceRecord, RoutingDocument
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


def _jwks(kid: str) -> str:
    return json.dumps(jwks_of(ec.generate_private_key(ec.SECP256R1()), kid), sort_keys=True, separators=(",", ":"))


def _jwks_live(controller: GatewayController) -> str:
    """The key set in the jwt_authn provider of the live snapshot's listener."""
    assert controller.live is not None
    hcm = controller.live.listener["filter_chains"][0]["filters"][0]["typed_config"]
    jwt = next(f for f in hcm["http_filters"] if f["name"] == JWT_FILTER)
    return str(jwt["typed_config"]["providers"][PROVIDER]["local_jwks"]["inline_string"])


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_key_set_envoy_refuses_never_replaces_the_one_in_force(shared_etcd: EtcdServer,
                                                                      tmp_path: Path) -> None:
    prefix = "/sluice-test/controller-jwks/"
    good = _jwks("good")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(good)
    settings = GatewaySettings(xds_dir=tmp_path / "xds", metrics_port=-1, listen_host="127.0.0.1",
                               listen_port=free_port(), admin_port=free_port(), envoy_concurrency=1,
                               jwt_issuer="sluice-dev", jwt_jwks=jwks_file)
    controller = GatewayController(settings, EtcdSettings(endpoints=[shared_etcd.endpoint], prefix=prefix))
    stop = asyncio.Event()
    running = asyncio.create_task(controller.run(stop))
    try:
        await _until(lambda: controller.live is not None, "the first snapshot is live")
        # Past the checks of parse_jwks (as a key set Envoy refuses would be): Envoy's validation
        # refuses it ("[n] field is missing for a RSA key").
        controller._jwks_changed('{"keys":[{"kty":"RSA"}]}')
        await _until(lambda: controller._pending_jwks is None, "the broken key set is dropped")
        assert controller.options.auth is not None and controller.options.auth.jwks == good
        assert _jwks_live(controller) == good
        # Routing changes still go live, with the key set in force.
        record = InstanceRecord(address="127.0.0.1:7001", model="iris", version=1, instance_id="i1")
        await controller._client.put(KeySchema(prefix).instance("iris", 1, "i1"), record.to_json())
        await _until(lambda: controller.live is not None and "iris" in controller.live.plans, "iris is routed")
        # A good rotation is taken once Envoy took it.
        rotated = _jwks("rotated")
        controller._jwks_changed(rotated)
        await _until(lambda: controller._pending_jwks is None, "the rotated key set is taken")
        assert controller.options.auth.jwks == rotated and _jwks_live(controller) == rotated
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        cleanup = EtcdClient(EtcdSettings(endpoints=[shared_etcd.endpoint], prefix=prefix))
        await cleanup.connect()
        await cleanup.delete_prefix(prefix)
        await cleanup.close()


async def test_a_render_equal_to_the_live_config_takes_over_its_plans(tmp_path: Path) -> None:
    """Nothing is published for a routing write whose render is what Envoy serves, yet its plans are
    in force: a later refused snapshot's status names that write as the routing in force (not the
    plan before it) and the refused one as failed; the live version stays the one Envoy serves."""
    schema = KeySchema("/sluice-test/controller-same-render/")
    controller = GatewayController(GatewaySettings(xds_dir=tmp_path / "xds", metrics_port=-1),
                                   EtcdSettings(endpoints=["127.0.0.1:2379"], prefix=schema.prefix))
    record = InstanceRecord(address="127.0.0.1:7001", model="iris", version=1, instance_id="a")
    instance = KeyValue(schema.instance("iris", 1, "a").encode(), record.to_json(), 5, 5, 1, 0)

    def routing(document: bytes, revision: int) -> KeyValue:
        return KeyValue(schema.routing("iris").encode(), document, revision, revision, 1, 0)

    try:
        live = render_snapshot(build_state(schema, 5, [instance]), {}, controller.options)
        controller._live = live  # what Envoy serves: no routing document, version 1 takes all
        same = render_snapshot(build_state(schema, 12, [instance, routing(b'{"weights": {"1": 100}}', 12)]), {},
                               controller.options)
        assert same.content_hash == live.content_hash and same.version != live.version
        assert await controller._publish(same, None) is None
        assert controller.live is not None and controller.live.version == live.version
        assert controller.live.revision == 12 and controller.live.plans == same.plans
        registry = controller.metrics.prometheus_registry
        assert registry.get_sample_value("sluice_gateway_snapshot_revision") == 12
        assert registry.get_sample_value("sluice_gateway_models") == 1

        refused = render_snapshot(build_state(schema, 13, [instance, routing(
            b'{"weights": {"1": 100}, "sticky_header": "x-user"}', 13)]), {}, controller.options)
        document = status_documents(refused, controller.live, None, failure="Envoy rejected it")["iris"]
        assert (document.routing_revision, document.routing_source, document.failed_routing_revision) == (
            12, "document", 13)
        assert document.routing == RoutingDocument.from_weights({1: 100})
        assert document.envoy_config_version == live.version and document.applied_revision == 12
    finally:
        controller._io.shutdown(wait=True)
        controller.admin.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broken", ["cert", "client_ca", "removed"])
async def test_a_tls_file_problem_at_start_names_the_tls_flags_not_the_port(pki: DevPki, tmp_path: Path,
                                                                           broken: str) -> None:
    """Files the settings accepted that cannot serve HTTPS by the time the controller starts: one
    GatewayError naming the admin TLS flags, not "cannot listen on" the metrics port."""
    cert, key, client_ca = (tmp_path / "admin.crt", tmp_path / "admin.key", tmp_path / "admin-ca.crt")
    for source, copy in ((pki.service.cert, cert), (pki.service.key, key), (pki.admin_ca.cert, client_ca)):
        shutil.copyfile(source, copy)
    settings = GatewaySettings(xds_dir=tmp_path / "xds", metrics_host="127.0.0.1", metrics_port=free_port(),
                               envoy_admin="http://127.0.0.1:1", admin_tls_cert=cert, admin_tls_key=key,
                               admin_tls_client_ca=client_ca)
    if broken == "removed":
        cert.unlink()
    else:
        (cert if broken == "cert" else client_ca).write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    controller = GatewayController(settings, EtcdSettings(endpoints=["127.0.0.1:2379"], prefix="/sluice-test/tls/"))
    try:
        with pytest.raises(GatewayError) as refused:
            await asyncio.wait_for(controller.run(asyncio.Event()), 30)
        message = str(refused.value)
        assert "--admin-tls-cert/--admin-tls-key and --admin-tls-client-ca" in message, message
        assert "cannot listen" not in message and "\n" not in message
        assert controller.metrics_port is None
    finally:
        controller._io.shutdown(wait=True)
        controller.admin.close()

