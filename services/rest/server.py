"""Runs the REST application in the service's own event loop (uvicorn with httptools), on a socket
bound here so that a taken port is one clear line (mesh.ports.bind_problem), as for gRPC."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from mesh.ports import bind_problem
from services.dataplane import DataPlane
from services.manager import ModelManager
from services.rest.app import RestApp

REST_PORT_FLAG = "--rest-port (default --port + 2; -1 turns REST off)"


class RestServer:
    def __init__(self, plane: DataPlane, manager: ModelManager, *, max_bytes: int, threads: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest-handler")
        self.app = RestApp(plane, manager, self.executor, max_bytes=max_bytes, max_in_flight=threads * 4)
        self._server: uvicorn.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise bind_problem("REST", host, port, REST_PORT_FLAG, exc.strerror or str(exc)) from exc
        config = uvicorn.Config(self.app, http="httptools", lifespan="off", log_config=None, access_log=False,
                                server_header=False, date_header=False, timeout_keep_alive=75)
        config.load()
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
