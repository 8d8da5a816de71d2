"""Reaching a process's admin port: an instance id (its address from etcd) or host:port, and the
HTTP calls to its ``/debug/`` endpoints (mesh/observability/admin.py), over HTTPS with a client
certificate (the admin identity) where the port requires one (:func:`client_tls`)."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mesh.errors import MeshError
from mesh.registry.etcd.client import EtcdClient
from mesh.registry.keys import KeySchema
from mesh.registry.settings import EtcdSettings
from mesh.registry.state import load_state
from mesh.tls_files import TlsFileError, read_ca, read_key_pair

MAX_ANSWER = 256 * 1024 * 1024
"""Largest answer read from an admin port (a profile of many threads and deep stacks stays far below)."""
_HTTPS_HINT = ("(an HTTPS admin port that wants the admin identity? give --admin-cert, --admin-key and --admin-ca, "
               "or $SLUICE_ADMIN_CERT/_KEY/_CA: eval \"$(sluice env)\" exports them for a `sluice up --secure`)")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


class DebugError(MeshError):
    """The admin port could not be found, reached, or refused the request (the message says which)."""


@dataclass(frozen=True)
class Target:
    name: str
    """What the user typed."""
    address: str
    """host:port of the admin port."""
    tls: ssl.SSLContext | None = None
    """HTTPS with this context (:func:`client_tls`); None: plain HTTP."""
    server_name: str | None = None
    """The name the admin port's certificate must carry (default: the host of :attr:`address`;
    through ``kubectl port-forward`` that is 127.0.0.1, which a pod's certificate rarely names)."""

    @property
    def shown(self) -> str:
        return self.address if self.name == self.address else f"{self.name} ({self.address})"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.address}"


def client_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The context to call an HTTPS admin port with: the server checked against ``ca``, and ``cert``/
    ``key`` presented (the admin identity); None when none is given. DebugError names a bad flag."""
    if ca is None and cert is None and key is None:
        return None
    if ca is None:
        raise DebugError("--admin-cert and --admin-key need --admin-ca "
                         "(the CA that signed the admin port's certificate)")
    if (cert is None) != (key is None):
        raise DebugError("--admin-cert and --admin-key go together: give both or neither")
    try:
        context = ssl.create_default_context(cadata=read_ca(ca, "--admin-ca").decode("ascii", errors="replace"))
        if cert is not None and key is not None:
            read_key_pair(cert, key, "--admin-cert", "--admin-key")
            context.load_cert_chain(cert, key)
    except TlsFileError as exc:
        raise DebugError(str(exc)) from exc
    except (ssl.SSLError, OSError) as exc:
        raise DebugError(f"--admin-cert {cert} / --admin-key {key}: {exc}") from exc
    return context


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to one address with the certificate checked for another name (``--admin-server-name``)."""

    def __init__(self, host: str, *, server_name: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, context=context, timeout=timeout)
        self._server_name = server_name
        self._tls = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


class _NamedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, server_name: str) -> None:
        super().__init__(context=context)
        self._tls, self._server_name = context, server_name

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        connection = functools.partial(_NamedHTTPSConnection, server_name=self._server_name, context=self._tls)
        return self.do_open(connection, req)


def _open(target: Target, request: urllib.request.Request, timeout: float) -> Any:
    if target.tls is not None and target.server_name:
        return urllib.request.build_opener(_NamedHTTPSHandler(target.tls, target.server_name)).open(
            request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout, context=target.tls)


def parse_address(text: str) -> str | None:
    """``text`` if it is host:port with a port 1-65535, else None."""
    match = _ADDRESS.fullmatch(text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        return None
    return text


async def _admin_address_from_etcd(instance: str, settings: EtcdSettings) -> str:
    client = EtcdClient(settings)
    try:
        await client.connect()
        state = await load_state(client, KeySchema(settings.prefix))
    finally:
        await client.close()
    records = [record for model in state.models.values() for by_id in model.instances.values()
               for instance_id, record in by_id.items() if instance_id == instance]
    if not records:
        raise DebugError(f"no instance {instance!r} is registered in etcd at {','.join(settings.endpoints)} "
                         "(sluice status lists them), and it is not host:port")
    addresses = sorted({r.admin_address for r in records if r.admin_address})
    if not addresses:
        raise DebugError(f"instance {instance!r} registers no admin address (metrics port off with "
                         "--metrics-port -1, or a service older than sluice debug); give its host:port")
    return addresses[0]


def resolve(instance: str, settings: EtcdSettings, tls: ssl.SSLContext | None = None,
            server_name: str | None = None) -> Target:
    """The admin port of ``instance``: host:port as given, else the instance id's record in etcd."""
    address = parse_address(instance)
    if address is not None:
        return Target(instance, address, tls, server_name)
    return Target(instance, asyncio.run(_admin_address_from_etcd(instance, settings)), tls, server_name)


def call(target: Target, path: str, params: dict[str, Any] | None = None, *, method: str = "GET",
         timeout: float = 30.0) -> tuple[str, bytes]:
    """(content type, body) of ``path`` on the target's admin port; DebugError on any failure."""
    query = urlencode({k: v for k, v in (params or {}).items() if v is not None})
    url = f"{target.url}{path}" + (f"?{query}" if query else "")
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with _open(target, request, timeout) as answer:
            body = answer.read(MAX_ANSWER + 1)
            kind = answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise DebugError(f"{target.shown} answered {exc.code}: {_server_error(exc)}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            raise DebugError(f"TLS with the admin port of {target.shown} failed: {_tls_reason(exc.reason, target)}"
                             ) from exc
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        if target.tls is None and isinstance(exc.reason, ConnectionResetError):
            reason = f"{reason} {_HTTPS_HINT}"
        raise DebugError(f"cannot reach the admin port of {target.shown}: {reason} (is the process running, "
                         "with its metrics port on?)") from exc
    except TimeoutError as exc:
        raise DebugError(f"{target.shown} did not answer within {timeout:g}s") from exc
    except ssl.SSLError as exc:
        raise DebugError(f"TLS with the admin port of {target.shown} failed: {_tls_reason(exc, target)}") from exc
    except OSError as exc:
        hint = f" {_HTTPS_HINT}" if target.tls is None and isinstance(exc, ConnectionResetError) else ""
        raise DebugError(f"connection to the admin port of {target.shown} failed: {exc}{hint}") from exc
    if len(body) > MAX_ANSWER:
        raise DebugError(f"{target.shown} answered more than {MAX_ANSWER} bytes; refused")
    return kind, body


def call_json(target: Target, path: str, params: dict[str, Any] | None = None, *, method: str = "GET",
              timeout: float = 30.0) -> dict[str, Any]:
    _kind, body = call(target, path, params, method=method, timeout=timeout)
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise DebugError(f"{target.shown} answered something that is not JSON (not a sluice admin port?)") from exc
    if not isinstance(document, dict):
        raise DebugError(f"{target.shown} answered JSON that is not an object (not a sluice admin port?)")
    return document


def _tls_reason(exc: ssl.SSLError, target: Target) -> str:
    reason = str(exc.reason or exc)
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        if isinstance(exc, ssl.SSLCertVerificationError) and "mismatch" in str(exc.verify_message):
            name = target.server_name or target.address.rpartition(":")[0]
            return (f"{exc.verify_message}: its certificate does not name {name!r} "
                    "(--admin-server-name: the name it carries)")
        return f"{reason}: its certificate is not signed by --admin-ca"
    if "CERTIFICATE_REQUIRED" in str(exc) or "HANDSHAKE_FAILURE" in str(exc):
        return f"{reason}: the port wants an admin client certificate (--admin-cert/--admin-key)"
    if isinstance(exc, ssl.SSLEOFError) or "EOF occurred" in str(exc):
        # TLS 1.3: a server that refuses the client's certificate may hang up before its alert arrives.
        return (f"{reason}: the port closed the connection; it may want an admin client certificate "
                "(--admin-cert/--admin-key) that its admin CA signed")
    return reason


def _server_error(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read(64 * 1024)
        message = json.loads(raw).get("error")
    except (ValueError, AttributeError, OSError):
        message = None
    if exc.code == 404 and message is None:
        return "no such endpoint (an admin port without /debug/: an older version?)"
    return " ".join(str(message or exc.reason).split())[:500]
