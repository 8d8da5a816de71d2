"""A small real HTTP server answering the Prometheus HTTP API's instant queries
(``GET /api/v1/query?query=...``) in Prometheus' own JSON format, from answers the test sets.
Prometheus itself cannot be installed here; the format follows its documentation."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def vector(*values: float | str) -> dict[str, Any]:
    """A success answer with one series per value (``"NaN"`` as Prometheus writes it)."""
    result = [{"metric": {"series": str(i)}, "value": [time.time(), str(v)]} for i, v in enumerate(values)]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def scalar(value: float) -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": "scalar", "result": [time.time(), str(value)]}}


def error(message: str) -> dict[str, Any]:
    return {"status": "error", "errorType": "bad_data", "error": message}


@dataclass
class FakePrometheus:
    url: str
    answer: dict[str, Any] = field(default_factory=vector)
    status: int = 200
    delay: float = 0.0
    raw: bytes | None = None
    """Sent as the body instead of ``answer`` (oversized or broken answers)."""
    wire: bytes | None = None
    """Written to the socket as the whole HTTP response, status line and headers included
    (answers broken below the body: too many headers, a cut chunked body)."""
    queries: list[str] = field(default_factory=list)


@contextmanager
def fake_prometheus() -> Iterator[FakePrometheus]:
    state: list[FakePrometheus] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fake = state[0]
            parsed = urllib.parse.urlsplit(self.path)
            if parsed.path != "/api/v1/query":
                self.send_error(404)
                return
            fake.queries.append(urllib.parse.parse_qs(parsed.query).get("query", [""])[0])
            time.sleep(fake.delay)
            if fake.wire is not None:
                self.close_connection = True
                self.wfile.write(fake.wire)
                return
            body = fake.raw if fake.raw is not None else json.dumps(fake.answer).encode()
            status = 400 if fake.answer.get("status") == "error" and fake.raw is None else fake.status
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.append(FakePrometheus(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
