"""Traffic through the real gateway follows etcd: splits, pins, sticky keys, errors, bad documents.

Real etcd, the real ``sluice gateway`` running the real Envoy, three real ``sluice serve``
processes (iris v1 twice, iris v2 once). Tests run in file order and each sets the routing it needs.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable

import grpc
import pytest

from mesh.registry.etcd import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.records import StatusDocument
from mesh.registry.state import set_weights
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from tests.fixtures.envoy import GatewayHandle
from tests.fixtures.etcd import EtcdServer
from tests.gateway.conftest import Fleet, register
from tests.gateway.traffic import assert_binomial, count_versions, eventually, grpc_error

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180)]

PROPAGATION_TIMEOUT_S = 10.0


async def read_status(client: EtcdClient, schema: KeySchema, model: str = "iris") -> StatusDocument | None:
    kv = await client.get(schema.status(model))
    return None if kv is None else StatusDocument.from_json(kv.value)


async def wait_status(client: EtcdClient, schema: KeySchema, predicate: Callable[[StatusDocument], bool],
                      what: str, model: str = "iris", *, timeout: float = PROPAGATION_TIMEOUT_S) -> StatusDocument:
    found: list[StatusDocument] = []

    async def check() -> bool:
        status = await read_status(client, schema, model)
        if status is not None and predicate(status):
            found.append(status)
            return True
        return False

    await eventually(check, timeout, what)
    return found[-1]


def header(model: str = "iris") -> list[tuple[str, str]]:
    return [("x-model-name", model)]


async def test_without_routing_document_newest_version_takes_all(
        registered: GatewayHandle, client: EtcdClient, schema: KeySchema) -> None:
    status = await wait_status(client, schema, lambda s: s.effective_weights == {2: 100}, "newest version 2 live")
    assert status.envoy_config_version == registered.routes_version()
    counts = await count_versions(registered.address, 200, header())
    assert counts == {"2": 200}


async def test_weights_80_20_then_50_50(registered: GatewayHandle, client: EtcdClient, schema: KeySchema) -> None:
    await set_weights(client, schema, "iris", {1: 80, 2: 20})
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 80, 2: 20}, "80/20 live")
    total = 4000
    counts = await count_versions(registered.address, total, header())
    assert set(counts) == {"1", "2"}
    assert_binomial(counts["1"], total, 0.8)

    await set_weights(client, schema, "iris", {1: 50, 2: 50})
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 50, 2: 50}, "50/50 live")
    counts = await count_versions(registered.address, 2000, header())
    assert_binomial(counts["1"], 2000, 0.5)


async def test_pin_header_selects_the_version(registered: GatewayHandle, client: EtcdClient,
                                              schema: KeySchema) -> None:
    await set_weights(client, schema, "iris", {1: 100})
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 100}, "100/0 live")
    # Version 2 has no weight, yet a pin reaches it (a canary checked before it gets traffic).
    assert await count_versions(registered.address, 100, [*header(), ("x-model-version", "2")]) == {"2": 100}
    assert await count_versions(registered.address, 100, [*header(), ("x-model-version", "1")]) == {"1": 100}
    error = await grpc_error(registered.address, [*header(), ("x-model-version", "7")])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "x-model-version" in (error.details() or "") and "1, 2" in (error.details() or "")


async def test_sticky_header_keeps_each_key_on_one_version(registered: GatewayHandle, client: EtcdClient,
                                                           schema: KeySchema) -> None:
    await set_weights(client, schema, "iris", {1: 50, 2: 50}, sticky_header="x-user")
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 50, 2: 50}, "sticky 50/50 live")
    versions_by_user: dict[str, set[str]] = collections.defaultdict(set)
    for user in range(40):
        counts = await count_versions(registered.address, 10, [*header(), ("x-user", f"user-{user}")],
                                      concurrency=2)
        versions_by_user[f"user-{user}"] |= set(counts)
    assert all(len(versions) == 1 for versions in versions_by_user.values()), versions_by_user
    chosen = collections.Counter(next(iter(v)) for v in versions_by_user.values())
    assert set(chosen) == {"1", "2"}, chosen  # 40 keys at 50/50: both versions get some
    # Without the sticky header the split is plain random again.
    counts = await count_versions(registered.address, 400, header())
    assert set(counts) == {"1", "2"}
    await set_weights(client, schema, "iris", {1: 50, 2: 50}, sticky_header="")


async def test_weighted_version_without_instances_gets_no_traffic(
        registered: GatewayHandle, client: EtcdClient, schema: KeySchema) -> None:
    await set_weights(client, schema, "iris", {1: 30, 3: 70})
    status = await wait_status(client, schema, lambda s: s.effective_weights == {1: 30}, "version 3 dropped")
    assert any("version 3 has weight 70 but no serving instances" in w for w in status.warnings), status.warnings
    assert await count_versions(registered.address, 200, header()) == {"1": 200}


# Written with plain etcdctl, as an operator would: (document, what the status error must name).
INVALID_DOCUMENTS = {
    "bad-json": ('{"weights": {"1": 50, "2": 50}', "JSON"),
    "negative-weight": ('{"weights": {"1": -10, "2": 110}}', "-10"),
    "unknown-key": ('{"weights": {"1": 50, "2": 50}, "wieghts": {"1": 1}}', "unknown field 'wieghts'"),
    "all-zero": ('{"weights": {"1": 0, "2": 0}}', "weights must sum to > 0"),
    "wrong-type": ('{"weights": {"1": "lots", "2": 0}}', "'lots'"),
}


@pytest.mark.parametrize("name", list(INVALID_DOCUMENTS))
async def test_invalid_routing_document_keeps_last_good(
        registered: GatewayHandle, shared_etcd: EtcdServer, client: EtcdClient, schema: KeySchema, name: str) -> None:
    document, named = INVALID_DOCUMENTS[name]
    await set_weights(client, schema, "iris", {2: 100})
    good = await wait_status(client, schema, lambda s: s.effective_weights == {2: 100} and not s.errors, "2 live")
    shared_etcd.etcdctl("put", schema.routing("iris"), document)
    status = await wait_status(client, schema, lambda s: bool(s.errors), "status error for the invalid document")
    assert any("invalid routing document" in e and named in e for e in status.errors), status.errors
    assert any("last good routing stays in force" in e for e in status.errors), status.errors
    # The effective routing did not move: same weights, and Envoy still serves the same route config.
    assert status.effective_weights == {2: 100}
    assert status.envoy_config_version == good.envoy_config_version == registered.routes_version()
    assert await count_versions(registered.address, 200, header()) == {"2": 200}


async def test_fixing_an_invalid_routing_document_clears_the_error(
        registered: GatewayHandle, shared_etcd: EtcdServer, client: EtcdClient, schema: KeySchema) -> None:
    shared_etcd.etcdctl("put", schema.routing("iris"), INVALID_DOCUMENTS["all-zero"][0])
    await wait_status(client, schema, lambda s: bool(s.errors), "status error for the invalid document")
    await set_weights(client, schema, "iris", {1: 100})  # the CLI's compare-and-swap overwrites it
    await wait_status(client, schema, lambda s: s.effective_weights == {1: 100} and not s.errors, "fixed")
    assert await count_versions(registered.address, 100, header()) == {"1": 100}


async def test_model_header_required_once_two_models_exist(
        registered: GatewayHandle, shared_etcd: EtcdServer, fleet: Fleet, client: EtcdClient,
        schema: KeySchema) -> None:
    # One model: requests without the header are for it.
    assert await count_versions(registered.address, 50) == {"1": 50}
    error = await grpc_error(registered.address, header("nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "x-model-name" in (error.details() or "")

    key = register(shared_etcd, schema, fleet.v1[0], 1, "other-a", model="other")
    try:
        await wait_status(client, schema, lambda s: bool(s.envoy_config_version), "model other live", "other")
        # The body names iris: routed on it without the header (tests/gateway/test_e2e_body_routing.py).
        assert await count_versions(registered.address, 20) == {"1": 20}
        # No name in the header or the body: the gateway says how to name one.
        async with grpc.aio.insecure_channel(registered.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10)
        error = raised.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "set header x-model-name" in (error.details() or "")
        assert "iris" in (error.details() or "") and "other" in (error.details() or "")
        assert await count_versions(registered.address, 50, header()) == {"1": 50}
    finally:
        shared_etcd.etcdctl("del", key)
    await eventually(lambda: _no_status(client, schema, "other"), PROPAGATION_TIMEOUT_S, "model other gone")
    assert await count_versions(registered.address, 50) == {"1": 50}


async def _no_status(client: EtcdClient, schema: KeySchema, model: str) -> bool:
    return await read_status(client, schema, model) is None


async def test_access_log_and_metrics(registered: GatewayHandle, client: EtcdClient, schema: KeySchema) -> None:
    await wait_status(client, schema, lambda s: bool(s.effective_weights), "iris live")
    await count_versions(registered.address, 5, [*header(), ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")])
    log_path = registered.xds_dir.parent / "access.log"

    async def logged() -> bool:
        return log_path.exists() and "a" * 32 in log_path.read_text()

    await eventually(logged, 10.0, "access log line with the trace id")
    line = next(json.loads(x) for x in log_path.read_text().splitlines() if "a" * 32 in x)
    assert line["model"] == "iris" and line["request_id"] and line["grpc_status"] == 0
    assert line["cluster"].startswith("iris.v")
    metrics = registered.metrics_text()
    assert 'sluice_gateway_publishes_total{result="ok"}' in metrics
    assert "sluice_gateway_publish_seconds_bucket" in metrics
