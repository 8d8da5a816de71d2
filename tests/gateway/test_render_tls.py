"""Upstream TLS in the rendered clusters (gateway/render.py): gRPC over h2, REST over http/1.1,
Envoy's client certificate, the services' name checked; accepted by a real Envoy."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gateway.envoy import find_envoy, validate_snapshot
from gateway.render import render_snapshot
from mesh.registry.records import InstanceRecord
from tests.gateway.test_render import OPTIONS, SCHEMA, kv, state

TLS = replace(OPTIONS, upstream_tls_ca="/pki/ca.crt", upstream_tls_cert="/pki/gw.crt", upstream_tls_key="/pki/gw.key")


def _record(port: int) -> Any:
    record = InstanceRecord(address=f"127.0.0.1:{port}", rest_address=f"127.0.0.1:{port + 2}", model="iris",
                            version=1, instance_id=f"i{port}")
    return kv(SCHEMA.instance("iris", 1, f"i{port}"), record.to_json())


def test_no_upstream_tls_renders_plaintext_clusters() -> None:
    snapshot = render_snapshot(state(_record(7001)), {}, OPTIONS)
    assert all("transport_socket" not in cluster for cluster in snapshot.clusters.values())


@pytest.mark.parametrize(("san", "san_type", "sni"), [("localhost", "DNS", "localhost"),
                                                     ("spiffe://sluice.local/service", "URI", None),
                                                     (None, None, None)])
def test_model_clusters_speak_tls_with_the_client_certificate(san: str | None, san_type: str | None,
                                                              sni: str | None) -> None:
    snapshot = render_snapshot(state(_record(7001)), {}, replace(TLS, upstream_tls_san=san))
    for name, alpn in (("iris.v1", "h2"), ("iris.v1.rest", "http/1.1")):
        context = snapshot.clusters[name]["transport_socket"]["typed_config"]
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == [alpn]
        assert common["tls_certificates"][0]["certificate_chain"]["filename"] == "/pki/gw.crt"
        assert common["validation_context"]["trusted_ca"]["filename"] == "/pki/ca.crt"
        matchers = common["validation_context"].get("match_typed_subject_alt_names")
        assert (matchers and matchers[0]["san_type"]) == (san_type or None)
        assert context.get("sni") == sni


@pytest.mark.slow
async def test_real_envoy_accepts_tls_clusters(tmp_path: Any) -> None:
    from mesh.devstack.pki import ensure_dev_pki

    pki = ensure_dev_pki(tmp_path / "pki")
    options = replace(OPTIONS, upstream_tls_ca=str(pki.ca.cert), upstream_tls_cert=str(pki.gateway_client.cert),
                      upstream_tls_key=str(pki.gateway_client.key), upstream_tls_san="localhost")
    await validate_snapshot(find_envoy(), render_snapshot(state(_record(7001)), {}, options))
