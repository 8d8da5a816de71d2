"""Runs the REST application in the service's own event loop (uvicorn with httptools), on a socket
bound here so that a taken port is one clear line (mesh.ports.bind_problem), as for gRPC."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn

from mesh.ports import bind_problem
from services.dataplane import DataPlane
from services.manager import ModelManager
from services.rest.app import RestApp

REST_PORT_FLAG = "--rest-port (default --port + 2; -1 turns REST off)"


def _quick_ack(base: Any) -> Any:
    """The HTTP protocol with TCP_NODELAY on each connection and delayed ACKs off after every read.
    Without TCP_NODELAY (the socket is bound here, not by asyncio) each answer's body waited for the
    client's delayed ACK of its headers: measured 44 ms p50 per request instead of 0.78 ms. The quick
    ACK is for clients that write headers and body separately (http.client, tritonclient.http); it
    was not measured on its own."""
    quick_ack = getattr(socket, "TCP_QUICKACK", None)
    if quick_ack is None:
        return base

    class QuickAckProtocol(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._ack_socket = transport.get_extra_info("socket")
            if self._ack_socket is not None:
                with contextlib.suppress(OSError):
                    self._ack_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._ack_socket is not None:
                with contextlib.suppress(OSError):
                    self._ack_socket.setsockopt(socket.IPPROTO_TCP, quick_ack, 1)

    return QuickAckProtocol


class RestServer:
    def __init__(self, plane: DataPlane, manager: ModelManager, *, max_bytes: int, threads: int,
                 tls: Mapping[str, Any] | None = None) -> None:
        self.tls = dict(tls or {})
        """uvicorn's ssl_* arguments (services/tls.py); empty: plaintext."""
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest-handler")
        self.app = RestApp(plane, manager, self.executor, max_bytes=max_bytes, max_in_flight=threads * 4)
        self._server: uvicorn.Server | None = None
        self.port = 0
        self.ssl_context: ssl.SSLContext | None = None
        """uvicorn's context for the port once started (None: plaintext); reloaded in place when
        the certificate files are renewed (services/tls.py)."""

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise bind_problem("REST", host, port, REST_PORT_FLAG, exc.strerror or str(exc)) from exc
        # limit_concurrency: past this many open connections or running requests uvicorn answers 503.
        # Twice the in-flight bound, so that the app's own 429 comes first and idle keep-alives fit.
        config = uvicorn.Config(self.app, http="httptools", lifespan="off", log_config=None, access_log=False,
                                server_header=False, date_header=False, timeout_keep_alive=75,
                                limit_concurrency=self.app.max_in_flight * 2, **self.tls)
        config.load()
        self.ssl_context = config.ssl
        config.http_protocol_class = _quick_ack(config.http_protocol_class)
        self._server = uvicorn.Server(config)
        # What Server.serve sets up besides the signal handlers, which stay the service's own.
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[sock])
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._server.shutdown()
            self._server = None
        self.executor.shutdown(wait=False, cancel_futures=True)
