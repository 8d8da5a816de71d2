"""The gateway's certificates as Envoy SDS secrets, published from watched files.

Envoy never reads the operator's certificate files itself. The controller reads and checks them
(:mod:`mesh.tls_files`: PEM, size cap, key matching its certificate) and publishes each as an SDS
secret with the PEM inline, one file per secret (``sds-<secret>.yaml``) in the watched xDS
directory, beside the snapshot's files and swapped in with them (:mod:`gateway.publish`). The
listener's ``DownstreamTlsContext`` and the model clusters' ``UpstreamTlsContext`` name these
secrets (:mod:`gateway.render`), so a renewed certificate is one SDS update: Envoy uses it for new
connections, connections already open carry on, nothing drains and no request fails.

A renewed file that cannot be used (not PEM, a key that does not belong to the certificate, a
pair caught half-written) is refused with a log line, and the secret in force stays: one file of
a pair renewed before the other is refused until the other one follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from gateway.snapshot import Resource, content_hash, dump_yaml
from mesh.tls_files import TlsFileError, read_ca, read_key_pair

log = structlog.get_logger("gateway.tls")

TYPE_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
LISTENER_CERT = "sluice_listener_cert"
"""Secret of the listener's certificate and key (``--tls-cert``, ``--tls-key``)."""
LISTENER_CLIENT_CA = "sluice_listener_client_ca"
"""Secret of the CA the listener checks client certificates against (``--tls-client-ca``)."""
UPSTREAM_CERT = "sluice_upstream_cert"
"""Secret of Envoy's client certificate towards the services (``--upstream-tls-cert``, ``-key``)."""
UPSTREAM_CA = "sluice_upstream_ca"
"""Secret of the CA of the services' certificates (``--upstream-tls-ca``)."""

AuthMode = Literal["off", "tls", "mtls"]


def secret_file(secret: str) -> str:
    """The file of one SDS secret in the watched directory (Envoy's SDS takes one secret per file)."""
    return f"sds-{secret}.yaml"


@dataclass(frozen=True)
class TlsSource:
    """The files behind one secret: a certificate and its key, or a CA bundle."""

    secret: str
    paths: tuple[Path, ...]
    flags: tuple[str, ...]

    def load(self) -> Resource:
        """The checked SDS secret (without ``@type``); raises :class:`~mesh.tls_files.TlsFileError`."""
        if len(self.paths) == 2:
            cert, key = read_key_pair(self.paths[0], self.paths[1], self.flags[0], self.flags[1])
            return {"name": self.secret, "tls_certificate": {
                "certificate_chain": {"inline_string": cert.decode("ascii", errors="replace")},
                "private_key": {"inline_string": key.decode("ascii", errors="replace")}}}
        ca = read_ca(self.paths[0], self.flags[0])
        return {"name": self.secret, "validation_context": {
            "trusted_ca": {"inline_string": ca.decode("ascii", errors="replace")}}}


def tls_sources(*, tls_cert: Path | None = None, tls_key: Path | None = None, tls_client_ca: Path | None = None,
                upstream_tls_ca: Path | None = None, upstream_tls_cert: Path | None = None,
                upstream_tls_key: Path | None = None) -> tuple[TlsSource, ...]:
    """The secrets these settings ask for (paths made absolute: the controller may change directory)."""
    sources: list[TlsSource] = []
    if tls_cert is not None and tls_key is not None:
        sources.append(TlsSource(LISTENER_CERT, (tls_cert.absolute(), tls_key.absolute()),
                                 ("--tls-cert", "--tls-key")))
        if tls_client_ca is not None:
            sources.append(TlsSource(LISTENER_CLIENT_CA, (tls_client_ca.absolute(),), ("--tls-client-ca",)))
    if upstream_tls_ca is not None:
        sources.append(TlsSource(UPSTREAM_CA, (upstream_tls_ca.absolute(),), ("--upstream-tls-ca",)))
        if upstream_tls_cert is not None and upstream_tls_key is not None:
            sources.append(TlsSource(UPSTREAM_CERT, (upstream_tls_cert.absolute(), upstream_tls_key.absolute()),
                                     ("--upstream-tls-cert", "--upstream-tls-key")))
    return tuple(sources)


def secret_version(secret: Mapping[str, Any]) -> str:
    """The SDS version of a secret: a hash of its content (what Envoy's config dump reports back)."""
    return f"sds.{content_hash(secret)}"


def secret_document(secret: Mapping[str, Any]) -> bytes:
    """The file of one secret, shaped like a DiscoveryResponse (as the other xDS files)."""
    return dump_yaml({"version_info": secret_version(secret), "resources": [{"@type": TYPE_SECRET, **secret}]})


class TlsMaterial:
    """The secrets in force, loaded from their files; :meth:`reload` takes renewed files in.

    Blocking (file reads): the controller calls it in its I/O thread.
    """

    def __init__(self, sources: tuple[TlsSource, ...]) -> None:
        self.sources = sources
        # Checked by the settings already; a file gone since is an error at start, not a refusal.
        self._secrets: dict[str, Resource] = {source.secret: source.load() for source in sources}
        self.refused: dict[str, str] = {}
        """Secret → why its renewed files are refused (empty: the files on disk are in force)."""

    @property
    def secrets(self) -> dict[str, Resource]:
        """Secret name → the secret in force (a copy)."""
        return dict(self._secrets)

    def directories(self) -> set[Path]:
        """The folders to watch: renewals often replace a file (or, in Kubernetes, a symlinked folder)."""
        return {path.parent for source in self.sources for path in source.paths}

    def files(self) -> dict[str, bytes]:
        """File name → content of every secret in force (private keys inside: written 0600)."""
        return {secret_file(name): secret_document(secret) for name, secret in sorted(self._secrets.items())}

    def versions(self) -> dict[str, str]:
        return {name: secret_version(secret) for name, secret in self._secrets.items()}

    def reload(self) -> list[str]:
        """Read every source again; returns the secrets whose content changed and is now in force.

        A source whose files cannot be used keeps its secret in force and is logged once per reason.
        """
        changed: list[str] = []
        for source in self.sources:
            try:
                secret = source.load()
            except TlsFileError as exc:
                reason = str(exc)
                if self.refused.get(source.secret) != reason:
                    log.error("tls_files_refused", secret=source.secret, flags=list(source.flags), error=reason,
                              in_force=secret_version(self._secrets[source.secret]))
                self.refused[source.secret] = reason
                continue
            self.refused.pop(source.secret, None)
            if secret != self._secrets[source.secret]:
                self._secrets[source.secret] = secret
                changed.append(source.secret)
                log.info("tls_files_renewed", secret=source.secret, flags=list(source.flags),
                         version=secret_version(secret))
        return changed


def auth_mode(*, tls_cert: Path | None, tls_client_ca: Path | None, upstream_tls_ca: Path | None,
              upstream_tls_cert: Path | None, jwt_issuer: str | None) -> dict[str, str]:
    """What the status document reports as the authentication in force (see docs/security.md)."""
    listener: AuthMode = "off" if tls_cert is None else "mtls" if tls_client_ca is not None else "tls"
    upstream: AuthMode = "off" if upstream_tls_ca is None else "mtls" if upstream_tls_cert is not None else "tls"
    return {"tls": listener, "upstream_tls": upstream, "jwt": "on" if jwt_issuer else "off"}
