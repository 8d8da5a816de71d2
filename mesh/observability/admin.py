"""The admin port of a component: Prometheus ``/metrics`` as before, plus ``/debug/...`` to profile,
inspect memory and dump thread stacks of the running process (docs/observability.md).

Every path outside ``/debug/`` answers the metrics, as prometheus_client's server did. The debug
endpoints are bounded: one CPU profile at a time (409 while one runs), at most
:data:`DEBUG_CONCURRENCY` debug requests at once (429 beyond), capped seconds, depths and list
lengths, and every query parameter checked (400 names the bad one).

Who may call them (``--debug-endpoints``):

* ``auto`` (default): peers on loopback only (127.0.0.0/8, ::1). The admin port listens on
  127.0.0.1 unless configured otherwise; where it listens on all interfaces so Prometheus can
  scrape it (a Kubernetes pod), ``/metrics`` answers everyone, ``/debug/`` still only connections
  from inside the host or pod, which is where ``kubectl port-forward`` arrives.
* ``on``: anyone who reaches the port. ``off``: 404 for every debug path.

The admin identity (``--admin-tls-client-ca`` of ``sluice serve`` and of the ``sluice gateway``
controller): given ``tls``, a function that returns the SSL context of each new connection
(:func:`admin_tls_context`; both components' follow renewed files,
:class:`mesh.observability.admin_tls.AdminTls`), the port speaks HTTPS only and the handshake
requires a client certificate signed by the admin CA, for ``/metrics`` as for ``/debug/``. Every connection that
gets as far as a request then belongs to an admin, so ``auto`` answers it from anywhere. The
handshake runs on the connection's own thread with a timeout, so a caller that connects and
stays silent holds one thread for :data:`HANDSHAKE_TIMEOUT` seconds, never the accept loop.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from mesh.observability import profiling
from mesh.observability.memory import MAX_TOP, MemoryDebugger, UnknownSnapshotError

log = structlog.get_logger(__name__)

DebugAccess = Literal["auto", "on", "off"]
DEBUG_CONCURRENCY = 4
MAX_QUERY = 512
"""Longest query string of a debug request."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a caller of an HTTPS admin port has to finish its TLS handshake."""

_ENDPOINTS = {
    "/debug/profile": "GET: CPU profile of every thread; seconds (≤60, default 10), hz (1-250, default 100), "
                      "format speedscope|collapsed, idle 1|0 (0 leaves out threads waiting)",
    "/debug/threads": "GET: the stack of every thread now; format text|json, depth (1-128)",
    "/debug/memory": f"GET: memory snapshot (kept as m<N>); top (0-{MAX_TOP}, default 25), diff_from=m<N>",
    "/debug/memory/tracing": "POST: on=1|0, frames (1-25): tracemalloc on or off (off by default)",
}


class BadRequestError(ValueError):
    """A debug request with a query parameter that is missing, unknown, repeated or out of range."""


class _Query:
    def __init__(self, raw: str, allowed: tuple[str, ...]) -> None:
        if len(raw) > MAX_QUERY:
            raise BadRequestError(f"query string longer than {MAX_QUERY} characters")
        try:
            parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=16)
        except ValueError as exc:
            raise BadRequestError(f"malformed query string: {exc}") from exc
        unknown = sorted(set(parsed) - set(allowed))
        if unknown:
            raise BadRequestError(f"unknown parameter {unknown[0][:40]!r} (allowed: {', '.join(allowed) or 'none'})")
        repeated = [name for name, values in parsed.items() if len(values) > 1]
        if repeated:
            raise BadRequestError(f"parameter {repeated[0]!r} given more than once")
        self._values = {name: values[0] for name, values in parsed.items()}

    def text(self, name: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        value = self._values.get(name, default)
        if choices is not None and value not in choices:
            raise BadRequestError(f"{name} must be one of {', '.join(choices)}, got {value[:40]!r}")
        return value

    def optional(self, name: str) -> str | None:
        return self._values.get(name)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self._values.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BadRequestError(f"{name} must be a number, got {raw[:40]!r}") from None
        if not low <= value <= high:  # NaN fails both
            raise BadRequestError(f"{name} must be between {low:g} and {high:g}, got {raw[:40]!r}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._values.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or len(raw) > 9:
            raise BadRequestError(f"{name} must be a whole number, got {raw[:40]!r}")
        value = int(raw)
        if not low <= value <= high:
            raise BadRequestError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._values.get(name)
        if raw is None:
            return default
        if raw not in ("0", "1", "true", "false", "on", "off"):
            raise BadRequestError(f"{name} must be 1 or 0, got {raw[:40]!r}")
        return raw in ("1", "true", "on")


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def admin_tls_context(cert: str | Path, key: str | Path, client_ca: str | Path) -> ssl.SSLContext:
    """A server context for the admin port: ``cert``/``key`` presented, a client certificate that
    ``client_ca`` signed required (the admin identity). Raises ssl.SSLError / OSError on bad files
    (check them first: mesh.tls_files)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class AdminServer:
    """``/metrics`` and ``/debug/...`` of one process, on a thread of their own; HTTPS with a
    required client certificate when given ``tls``, called once per connection for its context."""

    def __init__(self, registry: CollectorRegistry, *, debug: DebugAccess = "auto", component: str = "process",
                 memory_extras: Callable[[], dict[str, Any]] | None = None,
                 tls: Callable[[], ssl.SSLContext] | None = None) -> None:
        self.registry = registry
        self.debug = debug
        self.component = component
        self.tls = tls
        self.memory = MemoryDebugger(memory_extras)
        self._profiling = threading.Lock()
        self._debug_slots = threading.BoundedSemaphore(DEBUG_CONCURRENCY)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop_profile = threading.Event()

    def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 picks one); returns the bound port. Raises OSError if taken."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        handler = type("AdminHandler", (_Handler,), {"registry": self.registry, "admin": self})
        tls = self.tls

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, address = self.socket.accept()
                if tls is None:
                    return sock, address
                # The handshake waits for finish_request, on the connection's thread.
                return tls().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

            def finish_request(self, request: Any, client_address: Any) -> None:
                if isinstance(request, ssl.SSLSocket):
                    request.settimeout(HANDSHAKE_TIMEOUT)
                    try:
                        request.do_handshake()
                    except (ssl.SSLError, OSError) as exc:  # no admin certificate, plaintext, timeout
                        log.debug("admin_tls_refused", peer=str(client_address[0])[:64],
                                  reason=str(getattr(exc, "reason", None) or exc)[:200])
                        return
                    request.settimeout(None)
                super().finish_request(request, client_address)

        self._httpd = Server((host.strip("[]"), port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="admin-http", daemon=True)
        self._thread.start()
        if self.debug == "on" and self.tls is None and not is_loopback(host.strip("[]")):
            log.warning("debug_endpoints_unauthenticated", address=f"{host}:{port}",
                        detail="--debug-endpoints on, the admin port beyond loopback and no admin identity "
                               "(--admin-tls-client-ca): anyone who reaches the port can profile this "
                               "process and read its stacks and memory")
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._stop_profile.set()  # a profile in progress ends now with what it has
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- the endpoints: (status, content type, body) -----------------------------------------
    def handle(self, method: str, path: str, raw_query: str) -> tuple[int, str, bytes]:
        if path in ("/debug", "/debug/"):
            return _json(200, {"component": self.component, "endpoints": _ENDPOINTS})
        if path not in _ENDPOINTS:
            return _json(404, {"error": f"no debug endpoint {path[:80]!r}", "endpoints": sorted(_ENDPOINTS)})
        wanted = "POST" if path == "/debug/memory/tracing" else "GET"
        if method != wanted:
            return _json(405, {"error": f"{path} takes {wanted}, not {method}"})
        if not self._debug_slots.acquire(blocking=False):
            return _json(429, {"error": f"{DEBUG_CONCURRENCY} debug requests are running; try again"})
        try:
            if path == "/debug/profile":
                return self._profile(_Query(raw_query, ("seconds", "hz", "format", "idle")))
            if path == "/debug/threads":
                return self._threads(_Query(raw_query, ("format", "depth")))
            if path == "/debug/memory":
                query = _Query(raw_query, ("top", "diff_from"))
                return _json(200, self.memory.snapshot(query.integer("top", 25, 0, MAX_TOP),
                                                       query.optional("diff_from")))
            query = _Query(raw_query, ("on", "frames"))
            if query.optional("on") is None:
                raise BadRequestError("on=1 or on=0 is required")
            return _json(200, self.memory.set_tracing(query.flag("on", False),
                                                      query.integer("frames", 1, 1, 25)))
        except BadRequestError as exc:
            return _json(400, {"error": str(exc)})
        except UnknownSnapshotError as exc:
            return _json(404, {"error": str(exc)})
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        finally:
            self._debug_slots.release()

    def _profile(self, query: _Query) -> tuple[int, str, bytes]:
        seconds = query.number("seconds", 10.0, 0.01, profiling.MAX_SECONDS)
        hz = query.integer("hz", profiling.DEFAULT_HZ, 1, profiling.MAX_HZ)
        fmt = query.text("format", "speedscope", ("speedscope", "collapsed"))
        idle = query.flag("idle", True)
        if not self._profiling.acquire(blocking=False):
            return _json(409, {"error": "a profile is already running in this process; one at a time"})
        try:
            log.info("debug_profile", seconds=seconds, hz=hz, format=fmt, idle=idle)
            profile = profiling.sample(seconds, hz, idle=idle, stop=self._stop_profile)
        finally:
            self._profiling.release()
        if fmt == "collapsed":
            return 200, "text/plain; charset=utf-8", profile.collapsed().encode()
        document = profile.speedscope(f"{self.component} {seconds:g}s at {hz} Hz")
        document["sluice"] = {"ticks": profile.ticks, "seconds": round(profile.seconds, 3),
                              "dropped": profile.dropped, "idle_skipped": profile.idle_skipped}
        return _json(200, document)

    def _threads(self, query: _Query) -> tuple[int, str, bytes]:
        fmt = query.text("format", "text", ("text", "json"))
        depth = query.integer("depth", profiling.MAX_DEPTH, 1, profiling.MAX_DEPTH)
        stacks = [s.to_dict() for s in profiling.thread_stacks(depth)]
        if fmt == "json":
            return _json(200, {"threads": stacks})
        return 200, "text/plain; charset=utf-8", profiling.format_thread_stacks(stacks).encode()


def _json(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


class _Handler(MetricsHandler):
    """prometheus_client's handler (metrics on every path) with ``/debug/`` routed to the admin server."""

    admin: AdminServer

    def _debug_path(self) -> str | None:
        path = urlsplit(self.path).path
        return path if path == "/debug" or path.startswith("/debug/") else None

    def _loopback_both_ends(self) -> bool:
        """Whether the peer AND this connection's local address are loopback. The peer alone is not
        enough: Istio's sidecar delivers every inbound mesh call from 127.0.0.6 to the pod's IP, so
        only the local address tells a mesh caller (pod IP) from ``kubectl port-forward`` (127.0.0.1)."""
        try:
            local = self.connection.getsockname()
        except OSError:
            return False
        return is_loopback(str(self.client_address[0])) and is_loopback(str(local[0]))

    def _answer_debug(self, method: str) -> None:
        parts = urlsplit(self.path)
        admin = self.admin
        if admin.debug == "off":
            status, kind, body = _json(404, {"error": "debug endpoints are off here (--debug-endpoints off)"})
        elif admin.debug == "auto" and admin.tls is None and not self._loopback_both_ends():
            status, kind, body = _json(403, {"error": "debug endpoints answer connections from and to a loopback "
                                                      "address only (--debug-endpoints auto); use kubectl "
                                                      "port-forward or ssh"})
        else:
            try:
                status, kind, body = admin.handle(method, parts.path, parts.query)
            except Exception:  # a bug here must cost one answer, never the admin port
                log.exception("debug_endpoint_failed", path=parts.path[:80])
                status, kind, body = _json(500, {"error": "internal error; the process log has the traceback"})
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self._debug_path() is not None:
            self._answer_debug("GET")
        else:
            super().do_GET()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if self._debug_path() is None:
            self.send_error(405, "only GET outside /debug/")
            return
        if self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # the body is not read: this connection ends after the answer
        self._answer_debug("POST")
