"""TLS in the rendered config (gateway/render.py, gateway/tls.py, gateway/bootstrap.py): the listener
speaks TLS for gRPC and REST with an optional client-certificate requirement, the model clusters
speak TLS to the services (h2 and http/1.1) with Envoy's client certificate and the services' name
checked; certificates and CAs come by SDS from files in the watched directory; a real Envoy accepts
all of it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.bootstrap import validation_config
from gateway.envoy import find_envoy, redact_private_keys, validate_snapshot
from gateway.errors import EnvoyValidationError
from gateway.render import render_snapshot
from gateway.tls import (
    LISTENER_CERT,
    LISTENER_CLIENT_CA,
    TYPE_SECRET,
    UPSTREAM_CA,
    UPSTREAM_CERT,
    TlsMaterial,
    auth_mode,
    secret_file,
    tls_sources,
)
from mesh.devstack.pki import DevPki
from mesh.registry.records import InstanceRecord
from tests.gateway.test_render import OPTIONS, SCHEMA, kv, state

TLS = replace(OPTIONS, upstream_tls_ca="/pki/ca.crt", upstream_tls_cert="/pki/gw.crt", upstream_tls_key="/pki/gw.key")
LISTENER = replace(OPTIONS, tls_cert="/pki/gateway.crt")
XDS = OPTIONS.xds_dir


def _record(port: int) -> Any:
    record = InstanceRecord(address=f"127.0.0.1:{port}", rest_address=f"127.0.0.1:{port + 2}", model="iris",
                            version=1, instance_id=f"i{port}")
    return kv(SCHEMA.instance("iris", 1, f"i{port}"), record.to_json())


def _sds_source(config: dict[str, Any], secret: str) -> None:
    assert config["name"] == secret
    source = config["sds_config"]["path_config_source"]
    assert source["path"] == f"{XDS}/{secret_file(secret)}"
    assert source["watched_directory"]["path"] == XDS


def test_no_upstream_tls_renders_plaintext_clusters() -> None:
    snapshot = render_snapshot(state(_record(7001)), {}, OPTIONS)
    assert all("transport_socket" not in cluster for cluster in snapshot.clusters.values())
    assert "transport_socket" not in snapshot.listener["filter_chains"][0]


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
        _sds_source(common["tls_certificate_sds_secret_configs"][0], UPSTREAM_CERT)
        combined = common["combined_validation_context"]
        _sds_source(combined["validation_context_sds_secret_config"], UPSTREAM_CA)
        matchers = combined["default_validation_context"].get("match_typed_subject_alt_names")
        assert (matchers and matchers[0]["san_type"]) == (san_type or None)
        assert context.get("sni") == sni
        assert "/pki/" not in str(context)  # Envoy never reads the operator's files itself


def test_upstream_tls_without_a_client_certificate_names_only_the_ca() -> None:
    snapshot = render_snapshot(state(_record(7001)), {}, replace(OPTIONS, upstream_tls_ca="/pki/ca.crt"))
    common = snapshot.clusters["iris.v1"]["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificate_sds_secret_configs" not in common


@pytest.mark.parametrize("client_ca", [None, "/pki/ca.crt"])
def test_the_listener_speaks_tls_for_grpc_and_rest(client_ca: str | None) -> None:
    snapshot = render_snapshot(state(_record(7001)), {}, replace(LISTENER, tls_client_ca=client_ca))
    socket = snapshot.listener["filter_chains"][0]["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["@type"].endswith("DownstreamTlsContext")
    common = context["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    _sds_source(common["tls_certificate_sds_secret_configs"][0], LISTENER_CERT)
    if client_ca is None:
        assert "validation_context_sds_secret_config" not in common
        assert not context.get("require_client_certificate")
    else:
        _sds_source(common["validation_context_sds_secret_config"], LISTENER_CLIENT_CA)
        assert context["require_client_certificate"] is True


def test_listener_tls_renders_byte_identical() -> None:
    first = render_snapshot(state(_record(7001)), {}, replace(LISTENER, tls_client_ca="/pki/ca.crt"))
    second = render_snapshot(state(_record(7001)), {}, replace(LISTENER, tls_client_ca="/pki/ca.crt"))
    assert first.files() == second.files()


def test_secrets_carry_the_checked_files_inline(pki: DevPki) -> None:
    material = TlsMaterial(tls_sources(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key, tls_client_ca=pki.ca.cert,
                                       upstream_tls_ca=pki.ca.cert, upstream_tls_cert=pki.gateway_client.cert,
                                       upstream_tls_key=pki.gateway_client.key))
    files = material.files()
    assert set(files) == {secret_file(n) for n in (LISTENER_CERT, LISTENER_CLIENT_CA, UPSTREAM_CA, UPSTREAM_CERT)}
    document = yaml.safe_load(files[secret_file(LISTENER_CERT)])
    assert document["version_info"] == material.versions()[LISTENER_CERT]
    [secret] = document["resources"]
    assert secret["@type"] == TYPE_SECRET and secret["name"] == LISTENER_CERT
    certificate = secret["tls_certificate"]
    assert certificate["certificate_chain"]["inline_string"] == pki.gateway.cert.read_text()
    assert certificate["private_key"]["inline_string"] == pki.gateway.key.read_text()
    ca = yaml.safe_load(files[secret_file(UPSTREAM_CA)])["resources"][0]
    assert ca["validation_context"]["trusted_ca"]["inline_string"] == pki.ca.cert.read_text()


def test_a_renewed_pair_is_taken_and_a_broken_one_refused(pki: DevPki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.gateway.cert.read_bytes())
    key.write_bytes(pki.gateway.key.read_bytes())
    material = TlsMaterial(tls_sources(tls_cert=cert, tls_key=key))
    before = material.versions()[LISTENER_CERT]
    assert material.reload() == []
    cert.write_bytes(pki.service.cert.read_bytes())  # renewed certificate, key not yet
    assert material.reload() == []
    assert "does not belong to" in material.refused[LISTENER_CERT]
    assert material.versions()[LISTENER_CERT] == before
    key.write_bytes(pki.service.key.read_bytes())
    assert material.reload() == [LISTENER_CERT]
    assert material.refused == {}
    assert material.secrets[LISTENER_CERT]["tls_certificate"]["certificate_chain"]["inline_string"] == \
        pki.service.cert.read_text()
    cert.write_text("garbage")
    assert material.reload() == [] and "not PEM" in material.refused[LISTENER_CERT]


def test_validation_config_embeds_the_secrets_statically(pki: DevPki) -> None:
    material = TlsMaterial(tls_sources(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key,
                                       upstream_tls_ca=pki.ca.cert))
    options = replace(LISTENER, upstream_tls_ca="/pki/ca.crt")
    config = validation_config(render_snapshot(state(_record(7001)), {}, options),
                               secrets=list(material.secrets.values()))
    assert {s["name"] for s in config["static_resources"]["secrets"]} == {LISTENER_CERT, UPSTREAM_CA}
    assert "sds_config" not in str(config)


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, {"tls": "off", "upstream_tls": "off", "jwt": "off"}),
    ({"tls_cert": Path("c")}, {"tls": "tls", "upstream_tls": "off", "jwt": "off"}),
    ({"tls_cert": Path("c"), "tls_client_ca": Path("ca"), "upstream_tls_ca": Path("ca"), "jwt_issuer": "iss"},
     {"tls": "mtls", "upstream_tls": "tls", "jwt": "on"}),
    ({"upstream_tls_ca": Path("ca"), "upstream_tls_cert": Path("c")},
     {"tls": "off", "upstream_tls": "mtls", "jwt": "off"}),
])
def test_auth_mode(settings: dict[str, Any], expected: dict[str, str]) -> None:
    given: dict[str, Any] = {"tls_cert": None, "tls_client_ca": None, "upstream_tls_ca": None,
                             "upstream_tls_cert": None, "jwt_issuer": None}
    assert auth_mode(**{**given, **settings}) == expected


@pytest.mark.slow
async def test_real_envoy_accepts_tls_listener_and_clusters(pki: DevPki) -> None:
    material = TlsMaterial(tls_sources(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key, tls_client_ca=pki.ca.cert,
                                       upstream_tls_ca=pki.ca.cert, upstream_tls_cert=pki.gateway_client.cert,
                                       upstream_tls_key=pki.gateway_client.key))
    options = replace(OPTIONS, tls_cert=str(pki.gateway.cert), tls_client_ca=str(pki.ca.cert),
                      upstream_tls_ca=str(pki.ca.cert), upstream_tls_cert=str(pki.gateway_client.cert),
                      upstream_tls_key=str(pki.gateway_client.key), upstream_tls_san="localhost")
    await validate_snapshot(find_envoy(), render_snapshot(state(_record(7001)), {}, options),
                            secrets=list(material.secrets.values()))


@pytest.mark.slow
async def test_a_rejected_validation_never_quotes_a_private_key(pki: DevPki) -> None:
    material = TlsMaterial(tls_sources(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key))
    secret = material.secrets[LISTENER_CERT]
    real_key = secret["tls_certificate"]["private_key"]["inline_string"]
    # A field of the wrong type: Envoy refuses the config and quotes all of it back in its error.
    broken = {**secret, "tls_certificate": {**secret["tls_certificate"], "ocsp_staple": {"inline_string": 5}}}
    with pytest.raises(EnvoyValidationError) as caught:
        await validate_snapshot(find_envoy(), render_snapshot(state(_record(7001)), {}, LISTENER), secrets=[broken])
    key_body = real_key.splitlines()[1]
    for text in (str(caught.value), caught.value.output):
        assert "PRIVATE KEY" not in text and key_body not in text
    assert "Unable to parse JSON" in caught.value.output and "sluice_listener_cert" in caught.value.output


def test_validation_embeds_a_throwaway_pair_not_the_real_one(pki: DevPki) -> None:
    material = TlsMaterial(tls_sources(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key))
    config = validation_config(render_snapshot(state(_record(7001)), {}, LISTENER),
                               secrets=list(material.secrets.values()))
    assert pki.gateway.key.read_text().splitlines()[1] not in str(config)
    assert pki.gateway.cert.read_text().splitlines()[1] not in str(config)


def test_redact_private_keys() -> None:
    text = "a -----BEGIN PRIVATE KEY-----\\nMIG\\n-----END PRIVATE KEY----- b -----BEGIN EC PRIVATE KEY-----\\nMH"
    assert redact_private_keys(text) == "a <private key redacted> b <private key redacted>"
