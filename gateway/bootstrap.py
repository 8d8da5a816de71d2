"""Envoy's bootstrap (file-based LDS + CDS) and the static config used to validate a snapshot.

``envoy --mode validate`` reads only the bootstrap, never the dynamic files it points to, so a
snapshot is validated by embedding it: the listener with its routes inline, every cluster STATIC
with its endpoints inline. The certificates and keys of the SDS secrets are embedded as a
throwaway self-signed pair (:func:`throwaway_pair`), never the real ones: Envoy quotes the config
it cannot parse in its error, and that text reaches the log and the status documents. The real
pairs are checked by :mod:`mesh.tls_files` before they are published.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence

from gateway.snapshot import CDS_FILE, LDS_FILE, Resource, Snapshot, thaw

NODE_ID = "sluice-gateway"


def _file_source(directory: str, name: str) -> Resource:
    return {"resource_api_version": "V3",
            "path_config_source": {"path": f"{directory}/{name}", "watched_directory": {"path": directory}}}


def _admin(admin_port: int) -> Resource:
    # Admin can change Envoy's state (/quitquitquit, /runtime_modify): loopback only, never 0.0.0.0.
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}


TRACE_FLUSH_SPANS = 512
"""Spans Envoy's OpenTelemetry tracer keeps before an export call (else every 5 s). Envoy's
default, 5, makes one export call per 5 traced requests: at 100 % sampling that call, and the
collector's answer to it, cost more than the spans (docs/benchmarks.md, the hop one feature at a
time)."""


def runtime() -> Resource:
    """Envoy's runtime: the gateway's static values, then the admin layer (``/runtime_modify``)."""
    return {"layers": [
        {"name": "sluice", "static_layer": {"tracing.opentelemetry.min_flush_spans": TRACE_FLUSH_SPANS}},
        {"name": "admin", "admin_layer": {}},
    ]}


def bootstrap(xds_dir: str, admin_port: int) -> Resource:
    """The bootstrap of a gateway Envoy: listeners and clusters come from files in ``xds_dir``."""
    return {
        "node": {"id": NODE_ID, "cluster": NODE_ID},
        "admin": _admin(admin_port),
        "dynamic_resources": {
            "lds_config": _file_source(xds_dir, LDS_FILE),
            "cds_config": _file_source(xds_dir, CDS_FILE),
        },
        "layered_runtime": runtime(),
    }


def _static_secrets(resource: object) -> None:
    """Point every SDS secret reference inside ``resource`` at a static secret (in place)."""
    if isinstance(resource, dict):
        if "sds_config" in resource and "name" in resource:
            del resource["sds_config"]
        for value in resource.values():
            _static_secrets(value)
    elif isinstance(resource, list):
        for value in resource:
            _static_secrets(value)


@functools.cache
def throwaway_pair() -> tuple[str, str]:
    """(certificate, key) PEM of a self-signed pair made once per process, for validation only."""
    # Imported here: only a gateway with TLS files needs cryptography (the gateway extra has it).
    from cryptography import x509  # noqa: PLC0415 -- optional dependency
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 -- optional dependency
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 -- optional dependency
    from cryptography.x509.oid import NameOID  # noqa: PLC0415 -- optional dependency

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice-validation-only")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def _validation_secret(secret: Resource) -> Resource:
    """``secret`` with its certificate and key swapped for :func:`throwaway_pair` (CA bundles stay:
    they hold nothing private)."""
    copy: Resource = thaw(secret)
    certificate = copy.get("tls_certificate")
    if isinstance(certificate, dict):
        cert, key = throwaway_pair()
        certificate["certificate_chain"] = {"inline_string": cert}
        certificate["private_key"] = {"inline_string": key}
    return copy


def validation_config(snapshot: Snapshot, admin_port: int = 9901,
                      secrets: Sequence[Resource] = ()) -> Resource:
    """A static bootstrap holding the whole snapshot, for ``envoy --mode validate``.

    The SDS secrets the snapshot names (gateway/tls.py) are embedded as static secrets, their
    certificate and key replaced by a throwaway pair (see the module's docstring).
    """
    listener = thaw(snapshot.listener)
    _static_secrets(listener)
    for chain in listener["filter_chains"]:
        for network_filter in chain["filters"]:
            hcm = network_filter["typed_config"]
            if "rds" in hcm:
                del hcm["rds"]
                hcm["route_config"] = thaw(snapshot.route_config())
    clusters = []
    for name in sorted(snapshot.clusters):
        cluster = thaw(snapshot.clusters[name])
        cluster.pop("eds_cluster_config", None)
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = thaw(snapshot.endpoints[name])
        _static_secrets(cluster)
        clusters.append(cluster)
    static: Resource = {"listeners": [listener], "clusters": clusters}
    if secrets:
        static["secrets"] = [_validation_secret(secret) for secret in secrets]
    return {
        "node": {"id": NODE_ID, "cluster": NODE_ID},
        "admin": _admin(admin_port),
        "static_resources": static,
        "layered_runtime": runtime(),
    }
